"""The lean decode forward (`lean_decode.py`): transformers' decode step in fewer torch calls, same logits."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from server.engine import lean_decode
from server.engine.kv_cache import KVCache
from server.engine.runner import DecodeRow, ModelRunner, PrefillChunk
from server.model import BaseModel, load_base_model

pytestmark = pytest.mark.slow  # every test here loads the default model

# Torch calls of one lone-row decode step of the default model: transformers' modules make 1,840; the lean
# forward 1,087 with F.linear products and 1,447 with split products (three views each around one bmm).
MAX_CALLS_PER_STEP = 1_500


class CountCalls(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's signature
        self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def base() -> BaseModel:
    return load_base_model()


@pytest.fixture(scope="module")
def runner(base: BaseModel) -> ModelRunner:
    """With packed weight copies for the panel products and the attention kernel, as the server runs by default
    (`Settings.packed_weights`, `panel_products`, `attention_kernel`), and warmed up as at start-up: its product forms
    timed on this CPU."""
    runner = ModelRunner(base, KVCache.for_model(base.model.config, base.dtype, base.device, 1 << 26),
                         pack_weights=True, panel_products=True, attention_kernel=True)
    runner.warm_up()
    return runner


def without(runner: ModelRunner, name: str) -> Callable[[list[DecodeRow]], torch.Tensor]:
    """The runner's decode step with its attribute `name` (`lean`, `kernel`) set to None, as if it had none."""

    def decode(rows: list[DecodeRow]) -> torch.Tensor:
        kept = getattr(runner, name)
        setattr(runner, name, None)
        try:
            return runner.decode(rows)
        finally:
            setattr(runner, name, kept)

    return decode


def steps_agree(runner: ModelRunner, lengths: tuple[int, ...],
                reference: Callable[[list[DecodeRow]], torch.Tensor], *, atol: float = 2e-4) -> None:
    """Rows of `lengths` prefilled, then three decode steps (each step's keys written by the last): the runner's
    logits against `reference`'s for the same rows, which writes the same columns again, up to float rounding.

    float32 rounding by default: products sum in other orders. Measured: 2e-5 at most for the lean forward with split
    and oneDNN products, 1.1e-4 with the forms a Xeon timed fastest at start-up (MKL's F.linear among them), on
    logits up to about 20 in magnitude."""
    rng = random.Random(len(lengths))
    prompts = [[rng.randrange(3, 40000) for _ in range(n)] for n in lengths]
    slots = [runner.cache.allocate(n + 8) for n in lengths]
    try:
        logits = runner.prefill([PrefillChunk(p, 0, len(p), s) for p, s in zip(prompts, slots, strict=True)]).logits
        tokens = logits.argmax(-1).tolist()
        for step in range(3):
            rows = [DecodeRow(t, n + step, s) for t, n, s in zip(tokens, lengths, slots, strict=True)]
            got = runner.decode(rows)
            want = reference(rows)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=atol)
            assert torch.equal(got.argmax(-1), want.argmax(-1))
            tokens = got.argmax(-1).tolist()
    finally:
        for slot in slots:
            runner.cache.free(slot)


def test_the_default_model_decodes_through_the_lean_forward(runner):
    assert runner.lean is not None


@pytest.mark.parametrize("lengths", [(64,), (7, 40, 130), (5, 9, 17, 33, 65, 90), tuple(range(3, 63, 3))])
def test_lean_logits_equal_the_transformers_forward(runner, lengths):
    """A lone row and rows of different lengths, through the lean forward and through transformers' modules; 20 rows:
    past the rows whose product forms are timed at start-up, the panel products."""
    steps_agree(runner, lengths, without(runner, "lean"))


@pytest.fixture(scope="module")
def bf16_runner() -> ModelRunner:
    """The default model in bfloat16, as `--dtype bfloat16` runs it on a CPU."""
    if not lean_decode.bfloat16_products():
        pytest.skip("this CPU has neither avx512_bf16 nor AMX: oneDNN has no bfloat16 products here")
    base = load_base_model(dtype="bfloat16")
    runner = ModelRunner(base, KVCache.for_model(base.model.config, base.dtype, base.device, 1 << 25),
                         pack_weights=True, attention_kernel=True, compile_single=True)
    runner.warm_up()
    return runner


def test_bfloat16_keeps_the_lone_row_step_eager(bf16_runner):
    """Compiled, its logits would part from the eager step's by more than a check could tell from a wrong step."""
    assert bf16_runner.lone_row is None


@pytest.mark.parametrize("lengths", [(64,), (7, 40, 130), (5, 9, 17, 33, 65, 90)])
def test_bfloat16_lean_logits_equal_the_transformers_forward(bf16_runner, lengths):
    """In bfloat16 each op is transformers' own; only the fused products could sum in another order. Measured equal
    bit for bit on a Xeon with AMX; allowed: a few units in the last place of logits near 30 (0.125 each)."""
    assert bf16_runner.lean is not None and bf16_runner.kernel is not None
    steps_agree(bf16_runner, lengths, without(bf16_runner, "lean"), atol=0.5)


@pytest.mark.parametrize("lengths", [(64,), (7, 40, 130, 1), (5, 9, 17, 33, 65, 90, 300, 2)])
def test_the_attention_kernel_and_grouped_sdpa_give_the_same_steps(runner, lengths):
    """The runner's decode step with its attention kernel, then with SDPA over grouped slots (as without one).

    Float rounding, grown over 30 layers: logits 5e-5 apart at most on the AMD EPYC, 3.5e-4 on a Xeon, where the
    kernel's attention alone was closer to float64's than SDPA's (1-2e-6 against 3-5e-6)."""
    assert runner.kernel is not None
    steps_agree(runner, lengths, without(runner, "kernel"), atol=1e-3)


def test_the_step_writes_and_reads_the_runner_s_current_cache(base, runner):
    """The runner's cache can be another between steps (tests give it a small one): nothing holds the old."""
    kept = runner.cache
    runner.cache = KVCache.for_model(base.model.config, base.dtype, base.device, 1 << 25)
    try:
        slot = runner.cache.allocate(80)
        logits = runner.prefill([PrefillChunk(list(range(5, 69)), 0, 64, slot)]).logits
        rows = [DecodeRow(int(logits.argmax()), 64, slot)]
        torch.testing.assert_close(runner.decode(rows), without(runner, "lean")(rows), rtol=1e-5, atol=2e-4)
    finally:
        runner.cache = kept


def test_fused_projections_hold_no_second_copy_of_the_weights(base, runner):
    """The modules' q/k/v and gate/up weights are views of the fused tensors the lean forward reads."""
    layer, fused = base.layers[3], runner.lean.layers[3]
    for module, weights in ((layer.self_attn.q_proj, fused.qkv.weight), (layer.self_attn.v_proj, fused.qkv.weight),
                            (layer.mlp.up_proj, fused.gate_up.weight)):
        assert module.weight.untyped_storage().data_ptr() == weights.untyped_storage().data_ptr()


def test_a_lone_row_step_makes_few_torch_calls(runner):
    slot = runner.cache.allocate(80)
    try:
        runner.prefill([PrefillChunk(list(range(5, 69)), 0, 64, slot)])
        with CountCalls() as count:
            runner.decode([DecodeRow(7, 64, slot)])
    finally:
        runner.cache.free(slot)
    assert count.calls <= MAX_CALLS_PER_STEP


def tiny_llama(**overrides: object) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, **overrides)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("overrides", [{"attention_bias": True}, {"mlp_bias": True}, {"hidden_act": "gelu"},
                                       {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}])
def test_models_it_does_not_fit_decode_through_transformers(overrides):
    assert lean_decode.supports(tiny_llama())
    assert not lean_decode.supports(tiny_llama(**overrides))


def test_bfloat16_decodes_lean_only_where_the_cpu_has_bfloat16_products():
    assert lean_decode.supports(tiny_llama().to(torch.bfloat16)) == lean_decode.bfloat16_products()
    assert not lean_decode.supports(tiny_llama().to(torch.float16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_lean_norm_is_transformers_rmsnorm(dtype):
    """Bit for bit in bfloat16, where transformers rounds the normalised states before the weight's product."""
    model = tiny_llama().to(dtype)
    norm = model.model.layers[0].input_layernorm
    norm.weight.data = torch.randn(32).to(dtype)
    lean = lean_decode.LeanDecode(model)
    h = (torch.randn(5, 32) * 3).to(dtype)
    with torch.inference_mode():
        got, want = lean.norm(h, norm.weight), norm(h)
    if dtype == torch.bfloat16:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("parts", [2, 4])
def test_split_products_equal_f_linear_up_to_rounding(rows, parts):
    weight, x = torch.randn(96, 40), torch.randn(rows, 40)
    split = lean_decode.split_linear(x, weight.view(parts, -1, 40))
    torch.testing.assert_close(split, torch.nn.functional.linear(x, weight), rtol=1e-6, atol=1e-5)


def test_products_split_on_a_cpu_with_threads_only_where_rows_divide():
    threads = torch.get_num_threads()
    product = lean_decode.Product.of(torch.randn(4 * threads, 8))
    assert (product.blocks is not None) == (threads > 1)
    odd = lean_decode.Product.of(torch.randn(4 * threads + 1, 8))
    assert odd.blocks is None
    x = torch.randn(6, 8)  # more rows than SPLIT_ROWS: oneDNN's product (on a CPU), F.linear's up to rounding
    torch.testing.assert_close(product(x), torch.nn.functional.linear(x, product.weight), rtol=1e-6, atol=1e-5)
    assert product(torch.randn(0, 8)).shape == (0, 4 * threads)


@pytest.mark.parametrize("rows", [1, 2, 3, 6, 16])
def test_packed_products_equal_f_linear_and_split_only_up_to_two_rows(rows):
    weight = torch.randn(96, 40)
    packed = lean_decode.Product.of(weight, pack=True)
    plain = lean_decode.Product.of(weight)
    assert (packed.packed_bytes, plain.packed_bytes) == (weight.nbytes, 0)
    assert (packed.split_rows, plain.split_rows) == (lean_decode.SPLIT_ROWS_PACKED, lean_decode.SPLIT_ROWS)
    assert packed.onednn is not weight and packed.onednn.is_mkldnn
    x = torch.randn(rows, 40)
    torch.testing.assert_close(packed(x), torch.nn.functional.linear(x, weight), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(packed(x), plain(x), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("pack", [False, True])
def test_every_form_of_a_product_equals_f_linear_up_to_rounding(pack):
    weight = torch.randn(96, 40)
    product = lean_decode.Product.of(weight, pack=pack)
    assert "linear" in product.forms and ("onednn" in product.forms) == lean_decode.has_onednn_linear(weight)
    assert ("split" in product.forms) == (torch.get_num_threads() > 1)
    for rows in (1, 2, 3, 6, 16):
        x = torch.randn(rows, 40)
        for form in product.forms:
            torch.testing.assert_close(product.run(form, x), torch.nn.functional.linear(x, weight), rtol=1e-6,
                                       atol=1e-5)


def test_tuning_keeps_the_rule_unless_a_form_beats_it_by_the_margin():
    """A policy over fake timings: at n rows, the timings of the first measured count >= n decide."""

    def rule(rows: int) -> str:
        return "split" if rows <= 2 else "onednn"

    medians = {1: {"split": 1.0, "linear": 0.5, "onednn": 2.0},  # twice as fast: taken
               2: {"split": 1.0, "linear": 0.95, "onednn": 2.0},  # 5% faster, within the margin: the rule's kept
               4: {"split": 1.0, "linear": 3.0, "onednn": 1.2}}  # the rule's oneDNN 20% slower than split: split
    assert lean_decode.choose_forms(rule, medians) == ("linear", "split", "split", "split")
    even = {rows: {"split": 1.0, "linear": 1.0, "onednn": 1.0} for rows in (1, 2, 4)}
    assert lean_decode.choose_forms(rule, even) == ("split", "split", "onednn", "onednn")
    # a compiled step's rows time only the forms it can hold: the rule's oneDNN was not timed at 4 rows
    untimed = {4: {"split": 1.0, "linear": 0.98}}
    assert lean_decode.choose_forms(rule, untimed) == ("split", "split", "linear", "linear")


def test_tuning_gives_each_weight_shape_one_form_per_row_count_that_its_products_have(runner):
    layers = runner.lean.layers
    for products in ([runner.lean.head], *([layer.products[i] for layer in layers] for i in range(4))):
        assert len({p.tuned for p in products}) == 1  # one choice per shape, every layer's alike
        tuned = products[0].tuned
        assert len(tuned) == lean_decode.TUNED_ROWS[-1] and set(tuned) <= set(products[0].forms)
    # past the rows timed, the untuned rule: the panel products over their packed copy, then oneDNN's
    assert runner.lean.head.form(lean_decode.TUNED_ROWS[-1] + 1) == "panels"
    assert runner.lean.head.form(lean_decode.PANEL_ROWS + 1) == "onednn"


def test_a_compiled_row_count_takes_only_forms_a_graph_can_hold(monkeypatch):
    """However the timings fall (here oneDNN's product wins wherever it was timed), one row's layer products are
    split or F.linear when that step is compiled; the LM head, which runs after the graph, may take oneDNN's."""

    def onednn_wins(default, medians):  # noqa: ANN001, ANN202 - choose_forms' signature
        at = [medians[next(m for m in sorted(medians) if m >= rows)] for rows in range(1, max(medians) + 1)]
        return tuple("onednn" if "onednn" in timed else "linear" for timed in at)

    monkeypatch.setattr(lean_decode, "choose_forms", onednn_wins)
    lean = lean_decode.LeanDecode(tiny_llama(), pack=True)
    lean.tune(traced_rows=1)
    for layer in lean.layers:
        for product in layer.products:
            assert product.tuned[0] in lean_decode.TRACEABLE_FORMS and product.tuned[1] == "onednn"
    assert lean.head.tuned[0] == "onednn"


def test_the_packed_copy_costs_the_weights_bytes_once(base, runner):
    """Every product the lean forward holds is packed once: the four of each layer and the LM head."""
    products = [runner.lean.head, *(p for layer in runner.lean.layers for p in (layer.qkv, layer.o, layer.gate_up,
                                                                                 layer.down))]
    assert runner.lean.packed_bytes == sum(p.weight.nbytes for p in products)
    projections = sum(m.weight.nbytes for layer in base.layers for m in lean_decode.projections(layer))
    assert runner.lean.packed_bytes == projections + base.model.get_output_embeddings().weight.nbytes
