"""Train ReFT interventions on the frozen base model, following pyreft 0.1.0's recipe.

Each intervention holds its parameters exactly as pyreft's classes do (an orthogonally
parametrised [d, r] `rotate_layer`, `nn.Linear` learned sources and projections), and its
forward is `interventions.reference_apply` on the current tensors, so what is trained is what
the server computes. Interventions act, through forward hooks, on a decoder layer's output
(pyvene's `block_output`) at the adapter's prompt positions (`reference.hooked`). The loss is
cross-entropy on the completion tokens (plus the id that ends a completion, server/tokens.py)
only; AdamW with linear decay to 0, float32, gradient norm clipped at 1.0 (the transformers
Trainer defaults pyreft trains with).

`Trainer.step()` runs one optimisation step and returns its loss, so a caller decides what runs
between steps: the CLI's progress bar. `Trainer.accumulate(max_tokens)` runs one micro-step of a
step (forward and backward over the next few examples of its batch, gradients accumulated), so a
serving engine can spread a step of any batch size over many of its iterations; the step it
completes equals the step taken whole (tests/test_train.py checks it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from torch import Tensor, nn

from server import tokens
from server.adapter_file import Adapter, build, make_intervention
from server.interventions import INTERVENTION_TYPES, ORTHONORMAL_TYPES, Intervention
from server.model import BaseModel
from server.positions import Positions
from server.reference import hooked, locations_index

IGNORE_INDEX = -100


class DataError(ValueError):
    """Training data that cannot be used; the message names the file and line."""


class LowRankRotateLayer(nn.Module):
    """pyreft's LowRankRotateLayer: a [d, r] weight, orthogonally initialised (then parametrised)."""

    def __init__(self, d: int, r: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d, r))
        nn.init.orthogonal_(self.weight)


class TrainableIntervention(nn.Module):
    """One intervention's parameters in pyreft's parametrisation (same modules, same init order).

    noreft/nodireft use a projection without bias: for noreft a projection bias only duplicates
    the learned bias (b − b2), and nodireft never reads it.
    """

    def __init__(self, kind: str, layer: int, d: int, r: int) -> None:
        super().__init__()
        if kind not in INTERVENTION_TYPES:
            raise ValueError(f"unknown intervention type {kind!r} (known: {', '.join(INTERVENTION_TYPES)})")
        self.kind, self.layer, self.rank = kind, layer, r
        if kind in ORTHONORMAL_TYPES:
            self.rotate_layer = nn.utils.parametrizations.orthogonal(LowRankRotateLayer(d, r))
        else:
            self.proj_layer = nn.Linear(d, r, bias=False)
        if kind in ("consreft", "lobireft"):
            self.learned_source: nn.Module | nn.Parameter = nn.Parameter(torch.rand(r))
        else:
            self.learned_source = nn.Linear(d, r)

    def current(self) -> Intervention:
        """The intervention as the server sees it, built from the live (differentiable) tensors."""
        t: dict[str, Tensor] = {}
        if self.kind in ORTHONORMAL_TYPES:
            t["rotate_layer"] = self.rotate_layer.weight
        else:
            t["proj_weight"] = self.proj_layer.weight
        if isinstance(self.learned_source, nn.Linear):
            t["weight"], t["bias"] = self.learned_source.weight, self.learned_source.bias
        else:
            t["bias"] = self.learned_source
        return Intervention(type=self.kind, layer=self.layer, rank=self.rank, tensors=t)


# ---- data ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One JSONL line: a text prompt, or chat messages to render with the base model's template."""

    line: int
    completion: str
    prompt: str | None = None
    messages: list[dict] | None = None


@dataclass(frozen=True)
class Example:
    """One tokenized example; `completion_ids` ends with its end id and is what the loss scores."""

    line: int
    prompt_ids: list[int]
    completion_ids: list[int]


def _record(row: object, where: str, line: int) -> Record:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or len(messages) < 2:
            raise DataError(f"{where}: 'messages' must be a list of at least two messages (the last the answer)")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message is the completion and must have role 'assistant', "
                            f"not {messages[-1]['role']!r}")
        if not messages[-1]["content"]:
            raise DataError(f"{where}: the last (assistant) message is empty")
        return Record(line, messages[-1]["content"], messages=messages[:-1])
    missing = [k for k in ("prompt", "completion") if k not in row]
    if missing:
        raise DataError(f"{where}: missing field {', '.join(repr(k) for k in missing)} "
                        "(each line is {\"prompt\", \"completion\"} or {\"messages\": [...]})")
    prompt, completion = row["prompt"], row["completion"]
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise DataError(f"{where}: 'prompt' and 'completion' must be strings")
    if not prompt or not completion:
        raise DataError(f"{where}: 'prompt' and 'completion' must not be empty")
    return Record(line, completion, prompt=prompt)


def read_records(path: str | Path) -> list[Record]:
    """Parse a JSONL file of {"prompt", "completion"} or {"messages": [...]} lines; blank lines are skipped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot be read: {exc}") from exc
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{n}: not JSON ({exc.msg} at column {exc.colno})") from None
        records.append(_record(row, f"{path}:{n}", n))
    if not records:
        raise DataError(f"{path}: no examples (the file is empty)")
    return records


def records_from_rows(rows: Sequence[object], source: str = "data") -> list[Record]:
    """The examples of a JSON list (the HTTP training job's `data`), checked as the JSONL lines are."""
    if not rows:
        raise DataError(f"{source}: no examples")
    return [_record(row, f"{source}[{i}]", i) for i, row in enumerate(rows)]


def encode(records: Sequence[Record], base: BaseModel, source: str = "data") -> list[Example]:
    """Tokenize records; refuse (with the line number) any example that does not fit the context."""
    tok, generation = base.tokenizer, base.model.generation_config
    ends = {chat: tokens.completion_end_id(tok, generation, chat) for chat in (False, True)}
    out = []
    for r in records:
        where = f"{source}:{r.line}"
        if r.messages is not None:
            if not tokens.has_chat_template(tok):
                raise DataError(f"{where}: the base model has no chat template; use 'prompt' and 'completion'")
            try:
                prompt = tokens.chat_ids(tok, r.messages)
            except Exception as exc:  # noqa: BLE001 - a template error is the data's fault
                raise DataError(f"{where}: the chat template rejected these messages: {exc}") from exc
        else:
            prompt = tokens.text_ids(tok, r.prompt)
        completion = tok(r.completion, add_special_tokens=False)["input_ids"] + [ends[r.messages is not None]]
        if len(prompt) + len(completion) > base.max_context:
            raise DataError(f"{where}: {len(prompt)} prompt + {len(completion)} completion tokens exceed the "
                            f"model's context of {base.max_context}")
        out.append(Example(r.line, prompt, completion))
    return out


def load_examples(path: str | Path, base: BaseModel) -> list[Example]:
    return encode(read_records(path), base, str(path))


# ---- training -----------------------------------------------------------------------------------


def default_layers(num_layers: int) -> list[int]:
    """Two layers in the lower third (4 and 10 of SmolLM2's 30, as the shipped adapters use)."""
    return sorted({max(0, num_layers * 2 // 15), num_layers // 3})


@dataclass(frozen=True)
class TrainConfig:
    """What to train and how; the defaults are pyreft's emoji recipe (one step per epoch on 10 examples)."""

    kind: str = "loreft"
    layers: tuple[int, ...] | None = None  # None: default_layers(the base model's layer count)
    positions: str = "f2+l2"
    share_weights: bool = False
    rank: int = 4
    epochs: int = 60
    lr: float = 4e-3
    batch_size: int = 10
    seed: int = 0


def total_steps(examples: int, config: TrainConfig) -> int:
    """Optimisation steps of a run: epochs x batches per epoch (the last batch of an epoch may be short)."""
    return config.epochs * math.ceil(examples / min(config.batch_size, examples))


def step_tokens(examples: Sequence[Example], batch_size: int) -> int:
    """Tokens (prompt + completion) of the largest batch the examples can form: the most one step computes."""
    lengths = sorted((len(e.prompt_ids) + len(e.completion_ids) for e in examples), reverse=True)
    return sum(lengths[:batch_size])


@dataclass(frozen=True)
class MicroStep:
    """What one `Trainer.accumulate` call computed."""

    tokens: int  # token positions in its forward (rows x the longest row, padding included)
    loss: float | None  # the optimisation step's loss when this micro-step completed the step, else None


@dataclass
class _StepInProgress:
    """The batch of the step being accumulated: what is left of it, and its loss so far."""

    remaining: list[Example]
    completion_tokens: int  # of the whole batch: the mean loss's denominator
    loss: float = 0.0


def _rows_within(batch: Sequence[Example], max_tokens: int | None) -> int:
    """How many leading examples of `batch` fit, padded to the longest of them, in `max_tokens` positions (at least
    one)."""
    if max_tokens is None:
        return len(batch)
    rows, width = 1, len(batch[0].prompt_ids) + len(batch[0].completion_ids)
    while rows < len(batch):
        width = max(width, len(batch[rows].prompt_ids) + len(batch[rows].completion_ids))
        if (rows + 1) * width > max_tokens:
            break
        rows += 1
    return rows


def _collate(batch: Sequence[Example], pad: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded input ids, attention mask, and labels with prompt and padding masked out."""
    width = max(len(e.prompt_ids) + len(e.completion_ids) for e in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.prompt_ids) + len(e.completion_ids)
        ids[row, :n] = torch.tensor(e.prompt_ids + e.completion_ids)
        mask[row, :n] = 1
        labels[row, len(e.prompt_ids) : n] = torch.tensor(e.completion_ids)
    return ids.to(device), mask.to(device), labels.to(device)


class Trainer:
    """pyreft's training loop, one optimisation step per `step()` call.

    The base model is never changed: its parameters stay frozen and the intervention hooks are on
    its layers only while a step runs. The frozen layers below the lowest intervened one hold
    nothing that needs a gradient, so autograd records no graph there.
    """

    def __init__(self, base: BaseModel, examples: Sequence[Example], config: TrainConfig) -> None:
        c = config
        n_layers = base.shape.num_layers
        layers = list(c.layers) if c.layers is not None else default_layers(n_layers)
        if not examples:
            raise ValueError("no training examples")
        if c.kind not in INTERVENTION_TYPES:
            raise ValueError(f"unknown intervention type {c.kind!r} (known: {', '.join(INTERVENTION_TYPES)})")
        if not layers or any(not 0 <= layer < n_layers for layer in layers):
            raise ValueError(f"layers {layers} must be a non-empty list within 0..{n_layers - 1}")
        if not 1 <= c.rank <= base.shape.hidden_size:
            raise ValueError(f"rank {c.rank} is outside 1..{base.shape.hidden_size}")
        if c.epochs < 1 or c.batch_size < 1 or not c.lr > 0:
            raise ValueError(f"epochs ({c.epochs}) and batch size ({c.batch_size}) must be at least 1, lr positive")
        self.base, self.config, self.examples = base, c, list(examples)
        self.positions = Positions.parse(c.positions)
        if not c.share_weights and self.positions.first and self.positions.last:
            layers = layers * 2  # pyreft: the first half takes the prefix positions, the second the suffix
        self.share_weights = c.share_weights
        with torch.random.fork_rng(devices=[]):  # seeded init that leaves the caller's RNG alone
            torch.manual_seed(c.seed)
            self.modules = nn.ModuleList(
                TrainableIntervention(c.kind, layer, base.shape.hidden_size, c.rank) for layer in layers
            ).to(base.device)
        self.params = [p for p in self.modules.parameters() if p.requires_grad]
        self.batch_size = min(c.batch_size, len(self.examples))
        self.steps_per_epoch = math.ceil(len(self.examples) / self.batch_size)
        self.total_steps = total_steps(len(self.examples), c)
        self.optimizer = torch.optim.AdamW(self.params, lr=c.lr, weight_decay=0.0)
        total = self.total_steps
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: max(0.0, (total - s) / total))
        self._order = torch.Generator().manual_seed(c.seed)
        self._batches: list[list[Example]] = []
        self._step: _StepInProgress | None = None
        self.steps_done = 0
        self.pad = tokens.completion_end_id(base.tokenizer, base.model.generation_config, chat=False)

    @property
    def epoch(self) -> int:
        """Epochs completed so far."""
        return self.steps_done // self.steps_per_epoch

    @property
    def done(self) -> bool:
        return self.steps_done >= self.total_steps

    def _next_batch(self) -> list[Example]:
        if not self._batches:
            if self.steps_per_epoch == 1:
                self._batches = [self.examples]
            else:
                order = torch.randperm(len(self.examples), generator=self._order).tolist()
                self._batches = [[self.examples[i] for i in order[s : s + self.batch_size]]
                                 for s in range(0, len(order), self.batch_size)]
        return self._batches.pop(0)

    def _loss_sum(self, batch: Sequence[Example]) -> Tensor:
        """Summed next-token cross-entropy over the completion tokens of `batch` (divided by the step's count of
        them, it is the mean transformers computes from `labels`), with logits only from the shortest prompt's
        last token on: the vocabulary projection over prompt tokens would be a large, useless share of a step."""
        ids, mask, labels = _collate(batch, self.pad, self.base.device)
        where = locations_index([len(e.prompt_ids) for e in batch], self.positions, len(self.modules),
                                self.share_weights, self.base.device)
        start = min(len(e.prompt_ids) for e in batch)
        keep = torch.arange(start - 1, ids.shape[1] - 1, device=ids.device)
        with hooked(self.base.layers, [m.current() for m in self.modules], where):
            logits = self.base.model(input_ids=ids, attention_mask=mask, logits_to_keep=keep, use_cache=False).logits
        target = labels[:, start:]
        return nn.functional.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=IGNORE_INDEX,
                                           reduction="sum")

    def accumulate(self, max_tokens: int | None = None) -> MicroStep:
        """Forward and backward over the next examples of the current step's batch, in batch order, as many as
        fit in `max_tokens` token positions (always at least one; None: the whole rest of the batch).

        Each micro-batch's summed loss is divided by the whole batch's count of completion tokens, so
        the accumulated gradients are those of the batch's mean loss. The micro-step that ends the
        batch clips the gradient norm, steps the optimizer and the schedule, and returns the loss.
        """
        if self.done:
            raise RuntimeError(f"training is finished ({self.total_steps} steps)")
        if self._step is None:
            batch = self._next_batch()
            self._step = _StepInProgress(batch, sum(len(e.completion_ids) for e in batch))
            self.optimizer.zero_grad()
        step = self._step
        rows = _rows_within(step.remaining, max_tokens)
        part, step.remaining = step.remaining[:rows], step.remaining[rows:]
        loss = self._loss_sum(part) / step.completion_tokens
        loss.backward()
        step.loss += loss.item()
        tokens = rows * max(len(e.prompt_ids) + len(e.completion_ids) for e in part)
        if step.remaining:
            return MicroStep(tokens, None)
        self._step = None
        nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.schedule.step()
        self.steps_done += 1
        return MicroStep(tokens, step.loss)

    def step(self) -> float:
        """One optimisation step (the rest of the batch, when a step was being accumulated); returns its loss."""
        return cast(float, self.accumulate().loss)  # a whole batch's rest completes the step

    def adapter(self) -> Adapter:
        """The interventions as they are now, validated and ready to save (float32)."""
        shape = self.base.shape
        with torch.no_grad():
            interventions = [
                make_intervention(
                    i, m.kind, m.layer, m.rank,
                    {k: v.detach().float().cpu().clone() for k, v in m.current().tensors.items()},
                    shape, m.rank, "float32",
                )
                for i, m in enumerate(self.modules)
            ]
        return build(interventions, self.positions, self.share_weights, shape, "float32")
