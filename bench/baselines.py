"""Baseline worker for the benchmarks: raw transformers generate and peft mixed-adapter LoRA.

Runs as a separate process (started by bench/run.py) so that its torch threads and memory never
share a process with the HTTP client, and so the driver can make sure the server and these
baselines never compute at the same time. It reads one JSON command per line on stdin and
answers one JSON line per command on the protocol channel (the original stdout; everything
else the libraries print goes to stderr):

    {"cmd": "load", "model": null, "lora_adapters": 32, "lora_rank": 8, "seed": 0}
    {"cmd": "raw",  "prompts": [[ids], ...], "max_new_tokens": 32}
    {"cmd": "peft", "prompts": [[ids], ...], "max_new_tokens": 32}
    {"cmd": "quit"}

`raw` and `peft` answer {"seconds": wall time of model.generate, "tokens": generated tokens}.

Like the server, which runs the model on its engine thread, the worker runs every forward pass
on one long-lived non-main thread. Where the two differ, OpenMP (torch's CPU thread pool) can
behave very differently on a loaded machine: the calling thread's team of intra-op threads
spin-waits at barriers for peers that the OS has descheduled. Measured here on a shared 2-core
VM, the same prefill took 12 s on the main thread and 4 s on a second thread, so a baseline on
the main thread would be handicapped by the environment rather than by its code.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _protocol_stream():
    """Keep the real stdout for answers; send anything else written to fd 1 to stderr."""
    fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(fd, "w", buffering=1)


class Worker:
    def __init__(self) -> None:
        self.raw = None
        self.peft = None
        self.adapter_names: list[str] = []

    def load(self, model: str | None, lora_adapters: int, lora_rank: int, seed: int) -> dict:
        import torch
        from peft import LoraConfig, get_peft_model

        from server.model import load_base_model

        start = time.perf_counter()
        # The server's own choice of device and dtype (auto: CUDA + bfloat16 if present, else CPU + float32).
        self.raw = load_base_model(model).model
        if lora_adapters > 0:
            # A second, separate copy: peft rewrites the modules it wraps in place.
            base = load_base_model(model).model
            config = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                                target_modules=list(LORA_TARGETS), bias="none")
            self.adapter_names = [f"lora{i:02d}" for i in range(lora_adapters)]
            peft_model = get_peft_model(base, config, adapter_name=self.adapter_names[0])
            for name in self.adapter_names[1:]:
                peft_model.add_adapter(name, config)
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for pname, param in peft_model.named_parameters():
                    if ".lora_B." in pname:  # peft initialises B to zero: make every adapter matter
                        param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
            peft_model.eval().requires_grad_(False)
            self.peft = peft_model
        return {"seconds": time.perf_counter() - start, "adapters": len(self.adapter_names),
                "threads": torch.get_num_threads()}

    def generate(self, which: str, prompts: list[list[int]], max_new_tokens: int) -> dict:
        import torch

        model = self.raw if which == "raw" else self.peft
        if model is None:
            raise RuntimeError(f"{which} model is not loaded")
        ids = torch.tensor(prompts, dtype=torch.long, device=model.device)
        mask = torch.ones_like(ids)
        kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                      min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=2)
        if which == "peft":
            names = self.adapter_names
            kwargs["adapter_names"] = [names[i % len(names)] for i in range(len(prompts))]
        with torch.inference_mode():
            start = time.perf_counter()
            out = model.generate(**kwargs)
            if out.is_cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        generated = int(out.shape[1] - ids.shape[1]) * int(out.shape[0])
        return {"seconds": seconds, "tokens": generated, "first_row": out[0, ids.shape[1]:].tolist()}

    def step_times(self, prompts: list[list[int]], max_new_tokens: int) -> dict:
        """Raw generate (its default cache) on the prompts as one batch; the time at which each step's
        logits were ready, so that decode steps are timed without the prefill."""
        import torch
        from transformers import LogitsProcessor, LogitsProcessorList

        class Clock(LogitsProcessor):
            def __init__(self) -> None:
                self.times: list[float] = []

            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
                self.times.append(time.perf_counter())
                return scores

        model = self.raw
        ids = torch.tensor(prompts, dtype=torch.long, device=model.device)
        clock = Clock()
        with torch.inference_mode():
            start = time.perf_counter()
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                           min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=2,
                           logits_processor=LogitsProcessorList([clock]))
        return {"start": start, "times": clock.times}


def main() -> None:
    out = _protocol_stream()
    worker = Worker()
    model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="baseline-model")
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            msg = json.loads(line)
            cmd = msg.get("cmd")
            if cmd == "quit":
                out.write(json.dumps({"ok": True}) + "\n")
                break
            if cmd == "load":
                reply = model_thread.submit(worker.load, msg.get("model"), int(msg.get("lora_adapters", 32)),
                                            int(msg.get("lora_rank", 8)), int(msg.get("seed", 0))).result()
            elif cmd == "raw_steps":
                reply = model_thread.submit(worker.step_times, msg["prompts"], int(msg["max_new_tokens"])).result()
            elif cmd in ("raw", "peft"):
                reply = model_thread.submit(worker.generate, cmd, msg["prompts"], int(msg["max_new_tokens"])).result()
            else:
                raise ValueError(f"unknown command {cmd!r}")
            reply["ok"] = True
        except Exception as exc:  # noqa: BLE001 - reported to the driver, which stops the run
            traceback.print_exc()
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    main()
