"""The `reft-serve` command: serve, import-pyreft, train. Thin: parse, call, print."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import typer

from server.config import Settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Serve ReFT interventions on one base model.")

ENV = "REFT_"


@app.command()
def serve(
    model: str | None = typer.Option(None, envvar=ENV + "MODEL", help="HF dir, .gguf or hub id (default: SmolLM2)"),
    adapters: str = typer.Option("adapters", envvar=ENV + "ADAPTERS", help="adapter registry directory"),
    host: str = typer.Option("127.0.0.1", envvar=ENV + "HOST"),
    port: int = typer.Option(8000, envvar=ENV + "PORT"),
    device: str = typer.Option("auto", envvar=ENV + "DEVICE", help="auto|cpu|cuda"),
    dtype: str = typer.Option("auto", envvar=ENV + "DTYPE", help="auto|float32|bfloat16|float16"),
    max_batch_size: int = typer.Option(32, envvar=ENV + "MAX_BATCH_SIZE"),
    max_queue: int = typer.Option(256, envvar=ENV + "MAX_QUEUE"),
    api_key: str | None = typer.Option(None, envvar=ENV + "API_KEY", help="needed by /v1/* and /generate"),
    admin_key: str | None = typer.Option(None, envvar=ENV + "ADMIN_KEY", help="needed to upload or delete adapters"),
    read_only_registry: bool = typer.Option(
        False, "--read-only-registry", envvar=ENV + "READ_ONLY_REGISTRY",
        help="serve and scan a shared registry; refuse writes with 403",
    ),
    drain_seconds: float = typer.Option(30.0, envvar=ENV + "DRAIN_SECONDS",
                                        help="on SIGTERM, how long in-flight requests may finish"),
    allowed_hosts: str | None = typer.Option(
        None, envvar=ENV + "ALLOWED_HOSTS",
        help="comma-separated Host names accepted besides localhost and IP addresses ('*.example.com', '*' = any); "
             "default: any on a network bind, none on a loopback bind",
    ),
    allowed_origins: str | None = typer.Option(
        None, envvar=ENV + "ALLOWED_ORIGINS",
        help="comma-separated origins (scheme://host[:port]) whose pages may make admin calls besides the server's "
             "own ('*' = any)",
    ),
    compile: bool = typer.Option(  # the Settings field's name: tests/test_scale_out.py pairs them by name
        False, "--compile", envvar=ENV + "COMPILE",
        help="run decode steps through torch.compile (CUDA graphs on GPU); compiles at start-up",
    ),
    compile_single: bool = typer.Option(
        True, "--compile-single/--no-compile-single", envvar=ENV + "COMPILE_SINGLE",
        help="on a CPU, compile a lone stream's decode step at start-up (about 40 s, 10 s once cached)",
    ),
    native_single: bool = typer.Option(
        True, "--native-single/--no-native-single", envvar=ENV + "NATIVE_SINGLE",
        help="on a CPU in float32, a lone stream's decode step through a C++ library built at start-up (about 1 s)",
    ),
    prefix_cache: bool = typer.Option(
        True, "--prefix-cache/--no-prefix-cache", envvar=ENV + "PREFIX_CACHE",
        help="reuse the KV of prompt prefixes that earlier requests computed (shared across adapters where exact)",
    ),
) -> None:
    """Start the HTTP server. Every other setting is read from its REFT_* environment variable."""
    from server.api.app import create_app

    try:
        settings = Settings(
            model=model, adapters=adapters, host=host, port=port, device=device, dtype=dtype,
            max_batch_size=max_batch_size, max_queue=max_queue, api_key=api_key, admin_key=admin_key,
            read_only_registry=read_only_registry, allowed_hosts=allowed_hosts, allowed_origins=allowed_origins,
            drain_seconds=drain_seconds, compile=compile, compile_single=compile_single, native_single=native_single,
            prefix_cache=prefix_cache,
        )
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr, format="%(message)s")
    app = create_app(settings)
    _run(app, settings, app.state.reft.drain)


def _run(app: object, settings: Settings, drain: Callable[[], None]) -> None:
    """Run uvicorn; on SIGTERM/SIGINT, refuse new requests, let in-flight ones finish for up to
    `drain_seconds`, then exit 0 (uvicorn alone would re-raise SIGTERM and die by the signal)."""
    import uvicorn
    from sse_starlette.sse import AppStatus

    AppStatus.disable_automatic_graceful_drain()  # streams drain like other requests, within drain_seconds

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            drain()
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM:
                self._captured_signals.remove(sig)

    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            access_log=False, timeout_graceful_shutdown=settings.drain_seconds)
    DrainingServer(config).run()


@app.command("import-pyreft")
def import_pyreft(
    src_dir: Path = typer.Argument(..., help="a directory written by pyreft's ReftModel.save()"),
    dest: Path = typer.Argument(..., help="the native adapter file to write (NAME.safetensors)"),
    positions: str = typer.Option(..., help="where the interventions act: fN, lN or fN+lN (pyreft does not record it)"),
    share_weights: bool = typer.Option(False, "--share-weights/--no-share-weights"),
    model: str | None = typer.Option(None, envvar=ENV + "MODEL", help="base model the adapter must fit"),
    max_rank: int = typer.Option(64, envvar=ENV + "MAX_RANK"),
) -> None:
    """Convert a pyreft save directory into the native format, validated against the base model."""
    from server import adapter_file
    from server.model import ModelError, load_base_model
    from server.registry import atomic_write

    try:
        base = load_base_model(model, device="cpu", dtype="float32")
        adapter = adapter_file.import_pyreft(src_dir, positions, share_weights, base.shape, max_rank)
    except (adapter_file.AdapterError, ModelError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(dest, adapter_file.to_bytes(adapter))
    layers = ", ".join(str(iv.layer) for iv in adapter.interventions)
    typer.echo(f"wrote {dest}: {len(adapter.interventions)} x {'/'.join(adapter.types)} on layers {layers}, "
               f"rank {adapter.max_rank}, positions {adapter.positions}, share_weights={adapter.share_weights}")


def _layer_list(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated layer numbers such as 4,10, got {text!r}") from None


@app.command()
def train(
    data: Path = typer.Argument(..., help='JSONL: {"prompt", "completion"} or {"messages": [...]} per line'),
    out: Path = typer.Argument(..., help="the native adapter file to write (NAME.safetensors)"),
    model: str | None = typer.Option(None, envvar=ENV + "MODEL", help="HF dir, .gguf or hub id (default: SmolLM2)"),
    type_: str = typer.Option("loreft", "--type", help="loreft|noreft|consreft|lobireft|direft|nodireft"),
    layers: str | None = typer.Option(None, help="decoder layers to intervene after, e.g. 4,10 (default: two in "
                                                  "the lower third)"),
    positions: str = typer.Option("f2+l2", help="prompt positions: fN, lN or fN+lN"),
    share_weights: bool = typer.Option(False, "--share-weights/--no-share-weights",
                                       help="with fN+lN, one intervention per layer for both ends"),
    rank: int = typer.Option(4, help="intervention rank"),
    epochs: int = typer.Option(60),
    lr: float = typer.Option(4e-3, help="AdamW learning rate, decayed linearly to 0"),
    batch_size: int = typer.Option(10, help="examples per optimisation step"),
    seed: int = typer.Option(0, help="same seed, data and machine: the same file"),
    device: str = typer.Option("auto", envvar=ENV + "DEVICE", help="auto|cpu|cuda (training runs in float32)"),
) -> None:
    """Train an adapter on the frozen base model (loss on the completions only) and write it atomically."""
    import time

    from tqdm import tqdm

    from server import adapter_file
    from server.model import ModelError, load_base_model
    from server.registry import atomic_write
    from server.train import DataError, TrainConfig, Trainer, load_examples, read_records

    config = TrainConfig(kind=type_, layers=_layer_list(layers), positions=positions, share_weights=share_weights,
                         rank=rank, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
    try:
        read_records(data)  # bad data fails before the model loads
        base = load_base_model(model, device=device, dtype="float32")
        trainer = Trainer(base, load_examples(data, base), config)
    except (DataError, ModelError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    start, loss = time.monotonic(), float("nan")
    with tqdm(total=trainer.total_steps, desc=f"training {type_}", unit="step") as bar:
        while not trainer.done:
            loss = trainer.step()
            bar.set_postfix(epoch=trainer.epoch, loss=f"{loss:.4f}")
            bar.update()
    adapter = trainer.adapter()
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, adapter_file.to_bytes(adapter))
    layer_text = ", ".join(str(iv.layer) for iv in adapter.interventions)
    typer.echo(f"wrote {out}: {len(adapter.interventions)} x {type_} on layers {layer_text}, rank {rank}, "
               f"positions {adapter.positions}, share_weights={share_weights}; {len(trainer.examples)} examples, "
               f"{epochs} epochs, final loss {loss:.4f}, {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    app()
