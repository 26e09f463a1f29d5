"""Constrained decoding in the engine, on the real default model: 31 JSON schemas of the kinds clients
send, answered by the base model and two adapters, alone and in one batch with free rows; greedy and
seeded rows with logit_bias and penalties; the mask against the library's own; the compile cache.

One model and one running Scheduler for the module (as tests/test_engine.py).
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import jsonschema
import pytest
import torch
import xgrammar as xgr

from server.adapter_file import import_pyreft
from server.engine.adapter_cache import AdapterRef, DeviceAdapterCache
from server.engine.kv_cache import KVCache
from server.engine.loop import EngineLoop
from server.engine.runner import ModelRunner
from server.engine.sampling import SamplingParams
from server.engine.scheduler import EngineError, GenerationRequest, Scheduler
from server.engine.structured import (
    BLOCKED,
    CompiledGrammar,
    Constraint,
    GrammarCompiler,
    GrammarError,
    TokenMask,
    reference_mask,
)
from server.model import load_base_model
from tests.test_engine import DATA, EOS, EXPECTED, Result, random_adapter

pytestmark = pytest.mark.slow

SCHEMAS = json.loads((Path(__file__).parent / "data" / "structured_schemas.json").read_text())
MAX_NEW = 64
# Answers that hit max_tokens inside the JSON are the one allowed exception; a few are tolerated, not many
# (most come from the rows given a repetition penalty, which steers the model away from closing quotes).
MOST_LENGTH = 0.2
FORMATS = jsonschema.FormatChecker()


class Engine:
    def __init__(self) -> None:
        torch.manual_seed(0)
        self.base = load_base_model()
        runner = ModelRunner(self.base, KVCache.for_model(self.base.model.config, self.base.dtype,
                                                          self.base.device, 1 << 30))
        cache = DeviceAdapterCache(self.base.device, self.base.dtype, 1 << 28, set())
        policy = Scheduler(runner.cache, cache.get, max_batch_size=32, max_queue=256, max_prefill_tokens=8192,
                           max_prompt_tokens=4000, max_context=8192)
        self.sch = EngineLoop(runner, policy, lambda ids: self.base.tokenizer.decode(ids, skip_special_tokens=True),
                              eos_token_ids=[EOS])
        self.vocab = int(self.base.model.config.vocab_size)
        self.compiler = GrammarCompiler(self.base.tokenizer, self.vocab, [EOS])
        self.adapters = {
            "emoji": AdapterRef("emoji", 1, import_pyreft(DATA, EXPECTED["positions"], EXPECTED["share_weights"],
                                                          self.base.shape, 64)),
            "lo": AdapterRef("lo", 1, random_adapter(self.base, [("loreft", 3, 8), ("loreft", 9, 8)], "f3+l3", True,
                                                     seed=1, strength=3.0)),
        }

    def prompt(self, ask: str) -> list[int]:
        messages = [{"role": "system", "content": "Answer with JSON only."}, {"role": "user", "content": ask}]
        return list(self.base.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))

    def idle(self) -> bool:
        """Wait until no request is queued or running (a row leaves just after its last event)."""
        end = time.monotonic() + 60
        while (self.sch.num_running or self.sch.num_waiting) and time.monotonic() < end:
            time.sleep(0.01)
        return not (self.sch.num_running or self.sch.num_waiting)

    def grammar(self, constraint: Constraint) -> CompiledGrammar:
        return self.compiler.compile(constraint).result(timeout=60)

    def submit(self, prompt: list[int], params: SamplingParams, grammar: CompiledGrammar | None = None,
               adapter: str | None = None) -> Result:
        result = Result()
        ref = self.adapters[adapter] if adapter else None
        self.sch.submit(GenerationRequest(prompt, params, ref, result, grammar=grammar))
        return result


@pytest.fixture(scope="module")
def engine():
    e = Engine()
    e.sch.start()
    yield e
    e.sch.stop()
    e.compiler.close()


def check(result: Result, schema: dict, what: str) -> bool:
    """The answer parses and validates; False (tolerated) if it stopped at max_tokens. Nothing else passes."""
    result.wait()
    if result.finish == "length":
        return False
    assert result.finish == "stop", (what, result.events[-1])
    value = json.loads(result.text)
    jsonschema.Draft202012Validator(schema, format_checker=FORMATS).validate(value)
    return True


def test_the_batched_mask_equals_the_library_bit_by_bit(engine):
    """TokenMask's vectorised unpacking gives exactly the tokens xgrammar allows, row by row, other rows untouched."""
    grammars = [engine.grammar(Constraint.json_schema(s["schema"])) for s in SCHEMAS[:3]]
    matchers = [xgr.GrammarMatcher(g.compiled, override_stop_tokens=[EOS]) for g in grammars]
    assert matchers[1].accept_string('{"label":"')  # mid-way: the allowed set is not the initial one
    bits = xgr.allocate_token_bitmask(3, engine.vocab)
    for k, m in enumerate(matchers):
        m.fill_next_token_bitmask(bits, k)
    logits = torch.randn(5, engine.vocab)
    out = TokenMask(torch.tensor([0, 2, 4]), bits).apply(logits)
    for k, row in enumerate([0, 2, 4]):
        allowed = reference_mask(matchers[k], engine.vocab)
        assert 0 < int(allowed.sum()) < engine.vocab
        assert torch.equal(out[row] > BLOCKED / 2, allowed)
        assert torch.equal(out[row][allowed], logits[row][allowed])
    assert torch.equal(out[1], logits[1]) and torch.equal(out[3], logits[3])


def test_compiles_are_cached_by_constraint_shared_while_under_way_and_bounded(engine):
    compiler = GrammarCompiler(engine.base.tokenizer, engine.vocab, [EOS], max_entries=2)
    try:
        schema = {"type": "object", "properties": {"q": {"type": "integer"}}, "required": ["q"]}
        first = [compiler.compile(Constraint.json_schema(schema)) for _ in range(3)]
        assert first[0] is first[1] is first[2] and compiler.compiles == 1
        assert compiler.compile(Constraint.json_schema(json.loads(json.dumps(schema, indent=2)))) is first[0]
        assert compiler.cached(Constraint.json_schema(schema)) or first[0].result(timeout=60)
        compiler.compile(Constraint("regex", "[a-z]+")).result(timeout=60)
        compiler.compile(Constraint("regex", "[0-9]+")).result(timeout=60)
        assert compiler.compiles == 3 and not compiler.cached(Constraint.json_schema(schema))  # evicted: LRU of 2
    finally:
        compiler.close()


@pytest.mark.parametrize(("constraint", "words"), [
    (Constraint("regex", "a(b"), "parenthesis is not closed"),
    (Constraint("grammar", "root ::= foo"), 'Rule "foo" is not defined'),
    (Constraint.json_schema({"type": "foo"}), 'Unsupported type "foo"'),
    (Constraint.json_schema({"$ref": "#/$defs/missing"}), "$defs"),
    (Constraint.json_schema({"type": "string", "pattern": "[a-"}), "Regex"),
])
def test_invalid_constraints_fail_their_compile_with_the_library_s_reason(engine, constraint, words):
    future = engine.compiler.compile(constraint)
    with pytest.raises(GrammarError) as info:
        future.result(timeout=60)
    assert words in str(info.value) and "/project/" not in str(info.value)
    assert not engine.compiler.cached(constraint)  # a failure is not kept


@pytest.mark.parametrize("adapter", [None, "emoji", "lo"])
def test_every_schema_alone_with_the_base_model_and_each_adapter(engine, adapter):
    """One request at a time: each answer is the only row in its batch."""
    finished = sum(check(engine.submit(engine.prompt(s["ask"]), SamplingParams(max_new_tokens=MAX_NEW),
                                       engine.grammar(Constraint.json_schema(s["schema"])), adapter),
                         s["schema"], f"{s['name']} / {adapter}")
                   for s in SCHEMAS)
    assert finished >= len(SCHEMAS) * (1 - MOST_LENGTH)
    assert engine.idle() and len(engine.sch.grammars) == 0  # no matcher outlives its request


def test_every_schema_by_base_and_two_adapters_in_one_batch_with_free_rows(engine):
    """90 constrained rows (greedy, seeded, with logit_bias and penalties) and free rows share the batch."""
    runs, free = [], []
    hello = engine.base.tokenizer.convert_tokens_to_ids("Hello")
    for i, s in enumerate(SCHEMAS):
        grammar = engine.grammar(Constraint.json_schema(s["schema"]))
        for j, adapter in enumerate((None, "emoji", "lo")):
            kind = (i + j) % 3
            params = SamplingParams(max_new_tokens=MAX_NEW) if kind == 0 else (
                SamplingParams(max_new_tokens=MAX_NEW, temperature=0.7, seed=i * 3 + j) if kind == 1 else
                # a bias towards "Hello" (a token no schema allows first) and penalties: the mask still wins
                SamplingParams(max_new_tokens=MAX_NEW, logit_bias=((hello, 100.0),), frequency_penalty=0.5,
                               repetition_penalty=1.2))
            runs.append((s, adapter, engine.submit(engine.prompt(s["ask"]), params, grammar, adapter)))
        if i % 5 == 0:
            free.append(engine.submit(engine.prompt(s["ask"]), SamplingParams(max_new_tokens=24, temperature=0.5)))
    finished = sum(check(r, s["schema"], f"{s['name']} / {adapter}") for s, adapter, r in runs)
    assert finished >= len(runs) * (1 - MOST_LENGTH)
    for r in free:
        assert r.wait().finish in ("stop", "length")
    assert engine.idle() and len(engine.sch.grammars) == 0


def test_seeded_constrained_rows_give_the_same_tokens_alone_and_in_a_batch(engine):
    s = SCHEMAS[2]
    grammar = engine.grammar(Constraint.json_schema(s["schema"]))
    params = SamplingParams(max_new_tokens=40, temperature=1.0, seed=99)
    alone = engine.submit(engine.prompt(s["ask"]), params, grammar).wait().tokens
    others = [engine.submit(engine.prompt(o["ask"]), SamplingParams(max_new_tokens=30, temperature=0.9, seed=k),
                            engine.grammar(Constraint.json_schema(o["schema"])), "lo")
              for k, o in enumerate(SCHEMAS[5:9])]
    others.append(engine.submit(engine.prompt("Hi"), SamplingParams(max_new_tokens=30)))
    again = engine.submit(engine.prompt(s["ask"]), params, grammar)
    assert again.wait().tokens == alone
    for r in others:
        r.wait()


def test_choice_regex_and_grammar_constraints(engine):
    choice = engine.submit(engine.prompt("Is water wet?"), SamplingParams(max_new_tokens=10),
                           engine.grammar(Constraint.choice(["yes", "no", "it depends"])))
    regex = engine.submit(engine.prompt("Give a phone number."), SamplingParams(max_new_tokens=20),
                          engine.grammar(Constraint("regex", r"\+1-[0-9]{3}-[0-9]{4}")))
    ebnf = engine.submit(engine.prompt("Say hi"), SamplingParams(max_new_tokens=20, temperature=1.0, seed=3),
                         engine.grammar(Constraint("grammar", 'root ::= "hi" (" hi")? (" hi")? "!"')))
    assert choice.wait().text in ("yes", "no", "it depends") and choice.finish == "stop"
    assert re.fullmatch(r"\+1-[0-9]{3}-[0-9]{4}", regex.wait().text) and regex.finish == "stop"
    assert re.fullmatch(r"hi( hi)?( hi)?!", ebnf.wait().text) and ebnf.finish == "stop"


def test_a_cancelled_constrained_row_leaves_no_matcher_and_other_stopping_rules_are_refused(engine):
    grammar = engine.grammar(Constraint.json_schema(SCHEMAS[0]["schema"]))
    result = Result()
    request = GenerationRequest(engine.prompt("x"), SamplingParams(max_new_tokens=200), None, result, grammar=grammar)
    started = threading.Event()
    result.hook = lambda r, e: (started.set(), request.cancel())
    engine.sch.submit(request)
    assert started.wait(60)
    assert result.wait().finish == "cancelled"
    for params, words in ((SamplingParams(ignore_eos=True), "ignore_eos"), (SamplingParams(stop=("}",)), "stop "),
                          (SamplingParams(stop_token_ids=(7,)), "stop_token_ids")):
        with pytest.raises(EngineError, match=f"^{words}"):
            engine.sch.submit(GenerationRequest([1, 2, 3], params, None, Result(), grammar=grammar))
    assert engine.idle() and len(engine.sch.grammars) == 0


def test_an_unconstrained_batch_builds_no_mask(engine):
    assert engine.sch.grammars.mask([0, 1, 2], torch.device("cpu")) is None


# Schemas whose keyword xgrammar 0.2.9 compiles without enforcing, each with an instance the library's grammar
# accepts and the schema rejects: refused, so that every accepted schema's answer validates.
_OBJ_AB = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}
UNENFORCED = [
    ("allOf", {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                         {"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["b"]}]}, '{"a":1}'),
    ("allOf", {"type": "object", "properties": {"x": {"allOf": [{"type": "integer"}, {"minimum": 2}]}}}, '{"x":1}'),
    ("not", {"type": "integer", "not": {"const": 3}}, "3"),
    ("if", {**_OBJ_AB, "if": {"properties": {"a": {"const": 1}}}, "then": {"required": ["b"]}}, '{"a":1}'),
    ("oneOf", {"oneOf": [{"type": "integer"}, {"type": "number"}]}, "5"),
    ("uniqueItems", {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "[1,1]"),
    ("multipleOf", {"type": "number", "multipleOf": 0.5}, "0.3"),
    ("multipleOf", {"type": "integer", "multipleOf": 1.5}, "2"),
    ("dependentRequired", {**_OBJ_AB, "dependentRequired": {"a": ["b"]}}, '{"a":1}'),
    ("dependentSchemas", {**_OBJ_AB, "dependentSchemas": {"a": {"required": ["b"]}}}, '{"a":1}'),
    ("contains", {"type": "array", "items": {"type": "integer"}, "contains": {"const": 1}}, "[2]"),
    ("required", {"type": "object", "required": ["a"]}, "{}"),
    ("required", {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["b"],
                  "additionalProperties": True}, '{"a":1}'),
    ("minimum", {"minimum": 5}, "1"),
    ("minLength", {"minLength": 3}, '"a"'),
    ("maxItems", {"maxItems": 1}, "[1,2]"),
    ("minimum beside $ref", {"$defs": {"a": {"type": "integer"}}, "$ref": "#/$defs/a", "minimum": 5}, "1"),
    ("properties beside anyOf", {**_OBJ_AB, "anyOf": [{"required": ["a"]}, {"required": ["b"]}]}, "{}"),
    ("type beside anyOf", {"type": "string", "anyOf": [{"maxLength": 1}]}, '"abc"'),
    ("the value 1 fails", {"type": "string", "enum": ["a", 1]}, "1"),
    ("$dynamicRef", {"$defs": {"a": {"$dynamicAnchor": "x", "type": "integer"}}, "$dynamicRef": "#x"}, '"s"'),
    ("$ref '#x'", {"$defs": {"a": {"$anchor": "x", "type": "integer"}}, "$ref": "#x"}, '"s"'),
    ("format regex", {"type": "string", "format": "regex"}, '"("'),
    ("format idn-email", {"type": "string", "format": "idn-email"}, '"abc"'),
]


@pytest.fixture(scope="module")
def bytes_compiler() -> xgr.GrammarCompiler:
    """The library alone, on a vocabulary of single characters: enough to feed it any ASCII instance."""
    vocab = [chr(i) for i in range(32, 127)] + ["</s>"]
    return xgr.GrammarCompiler(xgr.TokenizerInfo(vocab, stop_token_ids=[len(vocab) - 1]), cache_enabled=False)


@pytest.mark.parametrize(("words", "schema", "instance"), UNENFORCED, ids=[u[0] for u in UNENFORCED])
def test_schemas_the_library_would_not_enforce_are_refused_naming_the_keyword(engine, bytes_compiler, words, schema,
                                                                                instance):
    """The library's own grammar accepts an instance the schema rejects (if it ever stops, lift the refusal), and
    the compiler refuses the schema naming the keyword."""
    compiled = bytes_compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"))
    matcher = xgr.GrammarMatcher(compiled)
    assert matcher.accept_string(instance) and matcher.accept_token(95), "the library enforces it now"
    assert not jsonschema.Draft202012Validator(schema, format_checker=FORMATS).is_valid(json.loads(instance))
    with pytest.raises(GrammarError, match=re.escape(words)):
        engine.compiler.compile(Constraint.json_schema(schema)).result(timeout=60)


@pytest.mark.parametrize("schema", [
    {"oneOf": [{"$ref": "#/$defs/cat"}, {"$ref": "#/$defs/dog"}], "discriminator": {"propertyName": "pet"},
     "$defs": {"cat": {"type": "object", "properties": {"pet": {"const": "cat"}, "lives": {"type": "integer"}},
                       "required": ["pet", "lives"]},
               "dog": {"type": "object", "properties": {"pet": {"const": "dog"}}, "required": ["pet"]}}},
    {"type": "string", "enum": ["a", "b"], "maxLength": 1, "title": "x"},
    {"type": "array", "items": {"type": "integer", "multipleOf": 3}, "uniqueItems": False},
    {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None, "title": "Maybe", "x-vendor": {"allOf": 1}},
])
def test_schemas_it_enforces_exactly_compile(engine, schema):
    engine.compiler.compile(Constraint.json_schema(schema)).result(timeout=60)


@pytest.mark.parametrize(("fmt", "loose", "good"), [
    ("date", ["2024-02-30", "2023-02-29", "0000-01-01"], ["2024-02-29", "2000-02-29", "0001-12-31"]),
    ("ipv4", ["100.00.00.10", "01.2.3.4"], ["0.0.0.0", "255.255.255.255", "10.0.0.1"]),
])
def test_formats_the_library_checks_loosely_are_compiled_exactly(engine, bytes_compiler, fmt, loose, good):
    """The library's own format allows values the validator rejects; the compiled grammar allows exactly the valid."""
    schema = {"type": "string", "format": fmt}
    library = bytes_compiler.compile_json_schema(json.dumps(schema))
    grammar = engine.grammar(Constraint.json_schema(schema))
    for value in loose + good:
        theirs = xgr.GrammarMatcher(library)
        ours = xgr.GrammarMatcher(grammar.compiled, override_stop_tokens=[EOS])
        valid = FORMATS.conforms(value, fmt)
        assert valid == (value in good)
        assert theirs.accept_string(json.dumps(value)) or valid, "the library checks it exactly now"
        assert ours.accept_string(json.dumps(value)) == valid, value
