"""Write a randomly initialised Llama (Llama-3-8B shape by default) as a model directory to serve.

Speed does not depend on the weights, so GPU figures are taken on random weights rather than on
a download (the benchmark machines reach no model hub):

    .venv/bin/python bench/random_model.py /tmp/llama-8b-random      # 8B shape, bfloat16, on CUDA if present
    .venv/bin/python bench/run.py --model /tmp/llama-8b-random

The tokenizer and chat template are the default model's (SmolLM2); its ids all lie inside the
random model's vocabulary, so prompts, adapters and the baselines work unchanged.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.model import converted_gguf_dir, default_gguf_path  # noqa: E402

SHAPES = {
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=49152, max_position_embeddings=2048),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="directory to write (must not exist)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-8b")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where to initialise the weights (fast on a GPU)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.out.exists():
        p.error(f"{args.out} exists")
    tokenizer = AutoTokenizer.from_pretrained(str(converted_gguf_dir(default_gguf_path())))
    config = LlamaConfig(**SHAPES[args.shape], bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False)
    if config.vocab_size < len(tokenizer):
        p.error(f"vocabulary {config.vocab_size} is smaller than the tokenizer's {len(tokenizer)}")
    torch.manual_seed(args.seed)
    torch.set_default_dtype(getattr(torch, args.dtype))  # initialise in the target dtype: no float32 copy
    with torch.device(args.device):
        model = LlamaForCausalLM(config)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    params = sum(t.numel() for t in model.parameters())
    print(f"wrote {args.out}: {args.shape}, {params / 1e9:.2f} B parameters, {args.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
