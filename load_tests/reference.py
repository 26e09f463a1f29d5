"""Tell a float near-tie from a wrong adapter when an answer differs from its replay alone.

A row's logits depend, in their last bits, on what it was computed beside: a prefill packed with
other prompts or cut into chunks, a decode step of one row or of many (matrix products of
different shapes round differently). Measured here, up to about 1e-4. A seeded draw whose uniform
falls that close to a boundary of its cumulative distribution, or a greedy step with two tokens
that close, goes one way in one batch and the other way in another, and the rest of the answer
follows from it. The batch an answer was computed in cannot be rebuilt from outside the server.

So `Reference.explain` checks the answer token by token against a plain forward over prompt and
answer (transformers, no KV cache, no packing, the adapter's interventions applied by hooks at its
prompt positions, as the training code does) and the engine's own sampler with the request's seed:
each token must be the sampler's pick or a near-tie (`near_tie`): for a greedy row, a logit within
1e-3 of the best; for a seeded one, a share of the cumulative distribution within 1e-4 of the draw.
A wrong adapter, or a wrong version of the right one, fails at the first token the right version
would neither pick nor nearly pick.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from server import adapter_file
from server.api.serving import derived_seed
from server.engine.sampling import LOGIT_BIAS_LIMIT, Sampler, SamplingParams, seeded_uniform
from server.model import BaseModel, load_base_model
from server.reference import hooked, plain_logits

LOGIT_TOLERANCE = 1e-3  # greedy: logits of one row in different batches differed by up to 1e-4 (float32, CPU)
CDF_TOLERANCE = 1e-4  # sampled: draws that went either way lay within 1.1e-6 of the boundary they crossed
MAX_RANK = 1024  # only a bound on what the files may hold; the load test writes rank 4

AdapterFiles = str | Path | Sequence[str | Path] | None  # no adapter, one file, or the files of a composition


@dataclass
class Verdict:
    """What the check found: where it needed a near-tie, and where (if anywhere) the answer went wrong."""

    checked: int = 0  # tokens checked
    near_ties: list[int] = field(default_factory=list)  # steps whose token was a near-tie, not the pick
    wrong_step: int | None = None  # the first step whose token was neither the pick nor a near-tie

    @property
    def explained(self) -> bool:
        return self.wrong_step is None


def sampling_params(endpoint: str, body: dict, max_new_tokens: int, copy: int = 0) -> SamplingParams:
    """The options of a load-test request that choose its tokens, with each endpoint's defaults, for its copy
    `copy` (choice `copy` of n, or sample `copy` of best_of: each draws with its own seed, as the server derives it).
    Stops and logprobs only end an answer or describe it; the tokens it has are chosen by these."""
    return SamplingParams(
        max_new_tokens=max(1, max_new_tokens),
        temperature=float(body.get("temperature", 0.0 if endpoint == "generate" else 1.0)),
        top_p=float(body.get("top_p", 1.0)), top_k=int(body.get("top_k", 0)),
        seed=derived_seed(body.get("seed"), copy),
        presence_penalty=float(body.get("presence_penalty", 0.0)),
        frequency_penalty=float(body.get("frequency_penalty", 0.0)),
        repetition_penalty=float(body.get("repetition_penalty", 1.0)),
        logit_bias=tuple((int(k), float(v)) for k, v in (body.get("logit_bias") or {}).items()),
    )


class Reference:
    """The base model in this process, float32 on the CPU, and the adapter files it has read."""

    def __init__(self, model: str | None = None, base: BaseModel | None = None) -> None:
        self.base = base or load_base_model(model, device="cpu", dtype="float32")
        self._adapters: dict[str, adapter_file.Adapter] = {}

    def adapter(self, path: str | Path) -> adapter_file.Adapter:
        key = str(path)
        if key not in self._adapters:
            self._adapters[key] = adapter_file.load(Path(path), self.base.shape, MAX_RANK)
        return self._adapters[key]

    def logits(self, prompt: Sequence[int], answer: Sequence[int], adapter: AdapterFiles) -> torch.Tensor:
        """[len(answer), V]: the logits each answer token was drawn from, given the tokens before it.

        `adapter`: one file, or a list of files composed in that order ("a+b"), each part at its own positions.
        """
        ids = list(prompt) + list(answer[:-1])
        if adapter is None or isinstance(adapter, str | Path):
            ad = self.adapter(adapter) if adapter is not None else None
            return plain_logits(self.base, ids, len(prompt), ad)[len(prompt) - 1 :]
        composite = adapter_file.Composite(tuple(self.adapter(path) for path in adapter))
        where = [(torch.zeros(len(locs), dtype=torch.long), torch.tensor(locs, dtype=torch.long))
                 for locs in composite.locations(len(prompt))]
        with hooked(self.base.layers, composite.interventions, where):
            out = self.base.model(input_ids=torch.tensor([ids], device=self.base.device), use_cache=False)
        return out.logits[0].float()[len(prompt) - 1 :]

    @torch.inference_mode()
    def explain(self, prompt: Sequence[int], answer: Sequence[int], params: SamplingParams,
                adapter: AdapterFiles) -> Verdict:
        """Whether `answer` is what the adapter file gives for `prompt`, up to float near-ties (see above)."""
        verdict = Verdict()
        if not answer:
            return verdict
        logits = self.logits(prompt, answer, adapter)
        # The sampler draws from the scores adjusted along the answer's own tokens (not its picks), so it gets the
        # request's truncation and seed only.
        sampler = Sampler(1, logits.shape[-1], "cpu")
        sampler.add(0, replace(params, logit_bias=(), presence_penalty=0.0, frequency_penalty=0.0,
                               repetition_penalty=1.0), prompt)
        slots = torch.tensor([0])
        for step, (row, token) in enumerate(zip(logits, answer, strict=True)):
            scores = adjusted(row, prompt, answer[:step], params)
            pick = sampler(scores[None], slots).token_ids[0]
            verdict.checked += 1
            if pick == token:
                continue
            if near_tie(scores, token, params, step):
                verdict.near_ties.append(step)
                continue
            verdict.wrong_step = step
            break
        return verdict


def adjusted(row: torch.Tensor, prompt: Sequence[int], generated: Sequence[int],
             params: SamplingParams) -> torch.Tensor:
    """The scores a row is drawn from, one rule at a time in sampling.py's order: logit bias (clamped), the
    repetition penalty on tokens of the prompt or the answer so far, then frequency and presence penalties."""
    out = row.clone()
    for token, bias in params.logit_bias:
        out[token] += max(-LOGIT_BIAS_LIMIT, min(LOGIT_BIAS_LIMIT, bias))
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt) | set(generated)), dtype=torch.long)
        values = out[seen]
        out[seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    counts = Counter(generated)
    if counts and (params.frequency_penalty or params.presence_penalty):
        ids = torch.tensor(list(counts), dtype=torch.long)
        times = torch.tensor(list(counts.values()), dtype=torch.float32)
        out[ids] -= params.frequency_penalty * times + params.presence_penalty
    return out


def near_tie(row: torch.Tensor, token: int, params: SamplingParams, step: int) -> bool:
    """Whether `token` is one float error away from being the pick on these logits (see the module's docstring).

    Greedy: its logit lies within LOGIT_TOLERANCE of the best. Seeded: its share of the cumulative
    distribution (kept tokens, in id order, as the sampler sums them) lies within CDF_TOLERANCE of
    the draw, with the top-p cut where it is or moved by one token where the kept mass is that
    close to top_p. A share moves with the errors of every token before it and with the cut, not
    only with its own logit, so the bound is on the share's place rather than on the token's logit.
    """
    if params.greedy:
        return float(row.max() - row[token]) <= LOGIT_TOLERANCE
    if params.seed is None:
        return False  # an unseeded draw cannot be recomputed
    probs = (row.double() / params.temperature).softmax(-1)
    if 0 < params.top_k < probs.shape[-1]:
        probs = torch.where(probs >= probs.topk(params.top_k).values[-1], probs, 0.0)
    order = probs.argsort(descending=True)
    before = probs[order].cumsum(-1) - probs[order]  # the mass ranked above each token
    cut = params.top_p * float(probs.sum())
    kept = max(1, int((before < cut).sum()))
    rank = int((order == token).nonzero()[0, 0])
    if rank >= kept and before[rank] >= cut + CDF_TOLERANCE:
        return False
    u = seeded_uniform(params.seed, step)
    cuts = [kept]
    if kept > 1 and before[kept - 1] >= cut - CDF_TOLERANCE:
        cuts.append(kept - 1)  # the last kept token nearly dropped out
    if kept < len(order) and before[kept] < cut + CDF_TOLERANCE:
        cuts.append(kept + 1)  # the next one nearly came in
    for n in cuts:
        share = torch.zeros_like(probs)
        share[order[:n]] = probs[order[:n]]
        share[token] = probs[token]
        cumulative = share.cumsum(-1) / share.sum()
        start, end = float(cumulative[token] - share[token] / share.sum()), float(cumulative[token])
        if start - CDF_TOLERANCE <= u <= end + CDF_TOLERANCE:
            return True
    return False
