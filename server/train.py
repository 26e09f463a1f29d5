"""Train ReFT interventions on the frozen base model, following pyreft 0.1.0's recipe.

Each intervention holds its parameters exactly as pyreft's classes do (an orthogonally
parametrised [d, r] `rotate_layer`, `nn.Linear` learned sources and projections), and its
forward is `interventions.reference_apply` on the current tensors, so what is trained is what
the server computes. Interventions act, through forward hooks, on a decoder layer's output
(pyvene's `block_output`) at the adapter's prompt positions. The loss is cross-entropy on the
completion tokens (plus an appended EOS) only; AdamW with linear decay to 0, float32, gradient
norm clipped at 1.0 (the transformers Trainer defaults pyreft trains with).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from server.adapter_file import Adapter, build, make_intervention
from server.interventions import INTERVENTION_TYPES, ORTHONORMAL_TYPES, Intervention, reference_apply
from server.model import BaseModel
from server.positions import Positions

IGNORE_INDEX = -100


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


@contextmanager
def hooked(
    layers: nn.ModuleList, interventions: Sequence[Intervention], where: Sequence[tuple[Tensor, Tensor]]
) -> Iterator[None]:
    """Apply `interventions[i]` after its layer at the (row, position) pairs `where[i]`.

    Several interventions on one layer apply in order, each reading what the previous wrote.
    """

    def hook_for(items: list[int]) -> Callable:
        def hook(_module: nn.Module, _inputs: object, output: Tensor | tuple) -> Tensor | tuple:
            h = output[0] if isinstance(output, tuple) else output
            for i in items:
                rows, cols = where[i]
                new = reference_apply(interventions[i], h[rows, cols].float()).to(h.dtype)
                h = h.index_put((rows, cols), new)
            return (h, *output[1:]) if isinstance(output, tuple) else h

        return hook

    by_layer: dict[int, list[int]] = {}
    for i, iv in enumerate(interventions):
        by_layer.setdefault(iv.layer, []).append(i)
    handles = [layers[layer].register_forward_hook(hook_for(items)) for layer, items in by_layer.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def locations_index(
    prompt_lengths: Sequence[int], positions: Positions, count: int, share_weights: bool, device: torch.device
) -> list[tuple[Tensor, Tensor]]:
    """Per intervention, the (row, position) index tensors it acts on across a batch."""
    pairs: list[list[tuple[int, int]]] = [[] for _ in range(count)]
    for row, length in enumerate(prompt_lengths):
        for i, locs in enumerate(positions.locations(length, count, share_weights)):
            pairs[i].extend((row, p) for p in locs)
    return [
        (torch.tensor([r for r, _ in p], dtype=torch.long, device=device),
         torch.tensor([c for _, c in p], dtype=torch.long, device=device))
        for p in pairs
    ]


def read_jsonl(path: str | Path) -> list[tuple[str, str]]:
    """Read (prompt, completion) pairs from lines of {"prompt": ..., "completion": ...}."""
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(
            row.get("completion"), str
        ):
            raise ValueError(f"{path}:{n}: each line must be an object with string 'prompt' and 'completion'")
        out.append((row["prompt"], row["completion"]))
    return out


def chat_prompt(base: BaseModel, question: str) -> str:
    """The base tokenizer's chat template around one user turn, ready for the assistant's answer."""
    return base.tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )


def encode_prompt(base: BaseModel, prompt: str) -> list[int]:
    """Prompt text to ids. No special tokens are added: chat-formatted text carries its own, and
    pyreft's fixture ids show no extra BOS (this GGUF tokenizer would prepend a second <|im_start|>)."""
    return base.tokenizer(prompt, add_special_tokens=False)["input_ids"]


def eos_id(base: BaseModel) -> int:
    eos = base.model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    if eos is None:
        raise ValueError("the base model's generation_config has no eos_token_id")
    return int(eos)


def _encode(base: BaseModel, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids + EOS) per example; the completion is what the loss scores."""
    eos = eos_id(base)
    return [
        (encode_prompt(base, p), base.tokenizer(c, add_special_tokens=False)["input_ids"] + [eos]) for p, c in pairs
    ]


def _collate(seqs: Sequence[tuple[list[int], list[int]]], pad: int, device: torch.device) -> tuple[Tensor, ...]:
    """Right-padded input ids, attention mask, and labels with prompt and padding masked out."""
    width = max(len(p) + len(c) for p, c in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    for row, (p, c) in enumerate(seqs):
        n = len(p) + len(c)
        ids[row, :n] = torch.tensor(p + c)
        mask[row, :n] = 1
        labels[row, len(p) : n] = torch.tensor(c)
    return ids.to(device), mask.to(device), labels.to(device)


def _completion_loss(base: BaseModel, ids: Tensor, mask: Tensor, labels: Tensor, shortest_prompt: int) -> Tensor:
    """Mean next-token cross-entropy over the labelled tokens (what transformers computes from
    `labels`), but with logits only from the last prompt token on: the vocabulary projection
    over prompt tokens is a large, useless share of a CPU step."""
    keep = torch.arange(shortest_prompt - 1, ids.shape[1] - 1, device=ids.device)
    logits = base.model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
    target = labels[:, shortest_prompt:]
    return nn.functional.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=IGNORE_INDEX)


def train_adapter(
    base: BaseModel,
    examples: list[tuple[str, str]],
    *,
    layers: list[int],
    rank: int,
    positions: str,
    share_weights: bool = True,
    kind: str = "loreft",
    epochs: int = 60,
    lr: float = 4e-3,
    seed: int = 0,
    progress: bool = True,
    chat: bool = True,
    batch_size: int | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
) -> Adapter:
    """Train one adapter on (prompt, completion) pairs and return it validated, ready to save.

    With `chat`, prompts are user questions wrapped in the base chat template. pyreft's layout:
    one intervention per layer, or with fN+lN and unshared weights the layers twice (the first
    half takes the prefix positions, the second the suffix). `batch_size` None = all examples
    per step (one step per epoch). `on_epoch(epoch, mean_loss)` is called after each epoch.
    """
    if not examples:
        raise ValueError("no training examples")
    if kind not in INTERVENTION_TYPES:
        raise ValueError(f"unknown intervention type {kind!r} (known: {', '.join(INTERVENTION_TYPES)})")
    if not layers or any(not 0 <= layer < base.shape.num_layers for layer in layers):
        raise ValueError(f"layers {layers} must be a non-empty list within 0..{base.shape.num_layers - 1}")
    if not 1 <= rank <= base.shape.hidden_size:
        raise ValueError(f"rank {rank} is outside 1..{base.shape.hidden_size}")
    if epochs < 1 or (batch_size is not None and batch_size < 1):
        raise ValueError(f"epochs ({epochs}) and batch_size ({batch_size}) must be at least 1")
    pos = Positions.parse(positions)
    all_layers = list(layers) if share_weights or not (pos.first and pos.last) else list(layers) * 2
    seqs = _encode(base, [(chat_prompt(base, q) if chat else q, a) for q, a in examples])

    torch.manual_seed(seed)
    modules = nn.ModuleList(TrainableIntervention(kind, L, base.shape.hidden_size, rank) for L in all_layers)
    modules.to(base.device)
    params = [p for p in modules.parameters() if p.requires_grad]
    size = batch_size or len(seqs)
    steps_per_epoch = math.ceil(len(seqs) / size)
    total = epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, (total - step) / total))
    order_gen = torch.Generator().manual_seed(seed)

    bar = tqdm(range(epochs), desc=f"training {kind}", disable=not progress)
    for epoch in bar:
        order = torch.randperm(len(seqs), generator=order_gen).tolist() if steps_per_epoch > 1 else None
        losses = []
        for start in range(0, len(seqs), size):
            chunk = [seqs[i] for i in order[start : start + size]] if order else seqs
            ids, mask, labels = _collate(chunk, eos_id(base), base.device)
            where = locations_index([len(p) for p, _ in chunk], pos, len(modules), share_weights, base.device)
            with hooked(base.layers, [m.current() for m in modules], where):
                loss = _completion_loss(base, ids, mask, labels, min(len(p) for p, _ in chunk))
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        mean = sum(losses) / len(losses)
        bar.set_postfix(loss=f"{mean:.3f}")
        if on_epoch is not None:
            on_epoch(epoch, mean)

    with torch.no_grad():
        interventions = [
            make_intervention(
                i, m.kind, m.layer, m.rank,
                {k: v.detach().float().cpu().clone() for k, v in m.current().tensors.items()},
                base.shape, rank, "float32",
            )
            for i, m in enumerate(modules)
        ]
    return build(interventions, pos, share_weights, base.shape, "float32")
