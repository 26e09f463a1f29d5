"""Every server option, each settable by a `REFT_<OPTION>` environment variable."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# A list given as one comma-separated string (an env variable, a CLI option): "a.example, b.example".
CommaList = Annotated[list[str] | None, NoDecode]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="REFT_", extra="ignore")

    model: str | None = Field(None, description="HF model directory, .gguf file or hub id; default: embedded SmolLM2")
    adapters: str = Field("adapters", description="adapter registry directory")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_batch_size: int = Field(32, ge=1, description="rows decoded together")
    max_queue: int = Field(256, ge=1, description="requests waiting beyond the running batch; more get 429")
    max_prefill_tokens: int = Field(8192, ge=1, description="prompt tokens admitted into one prefill")
    batch_wait_ms: float = Field(
        100.0, ge=0, le=10_000, description="most an idle engine waits for a burst to finish arriving; 0 = off"
    )
    batch_quiet_ms: float | None = Field(
        None, ge=0, le=10_000,
        description="an idle engine starts once no request has arrived for this long; default 30 on CPU, 2 on GPU",
    )
    prefill_chunk_tokens: int = Field(
        512, ge=16, description="prompt tokens computed per step while other rows decode (chunked prefill)"
    )
    kv_cache_bytes: int | None = Field(
        None, ge=1 << 20, description="KV cache bytes at start-up; default 4 GiB on CPU, 80% of free GPU memory"
    )
    compile: bool = Field(
        False, description="decode steps through torch.compile (inductor; CUDA graphs on GPU), compiled at start-up"
    )
    compile_single: bool = Field(
        True, description="on a CPU, where native_single is off or cannot be built, the decode step of a lone row "
                          "(one stream) through torch.compile, compiled at start-up: about 40 s the first time, "
                          "about 10 s from inductor's cache; needs a C++ compiler (without one, or with this off, that "
                          "step runs eagerly)")
    native_single: bool = Field(
        True, description="on a CPU in float32, the decode step of a lone row (one stream) as one call into a C++ "
                          "library built at start-up (about 1 s; needs a C++ compiler): products that read the "
                          "weights at the memory's streaming rate. Without it the step runs as compile_single says")
    packed_weights: bool = Field(
        True, description="on a CPU, keep a packed copy of the projection and LM-head weights for decode steps of 3 or "
                          "more rows (many streams): 1.5-2x faster products, for the weights' bytes again (513 MiB "
                          "with the default model); the panel products' copy where panel_products is on, else oneDNN's")
    panel_products: bool = Field(
        True, description="on a CPU in float32 with packed_weights on, the products of decode steps of up to 128 rows "
                          "through a C++ library built at start-up (about 0.5 s; needs a C++ compiler, else oneDNN's): "
                          "0.64-0.92x the time of oneDNN's")
    attention_kernel: bool = Field(
        True, description="on a CPU, decode attention through a small C++ kernel built at start-up (about 0.7 s; "
                          "needs a C++ compiler, else SDPA): half SDPA's time for many streams")
    prefix_cache: bool = Field(
        True, description="keep the KV of full prompt blocks after their request and reuse it for prompts that start "
                          "the same way (across adapters where no intervention differs); evicted whenever admission "
                          "needs the space")
    prefix_block_tokens: int = Field(
        32, ge=32, le=8192, description="tokens per prefix-cache block (a power of two): the unit of reuse")
    prefix_cache_scope: Literal["intervention", "adapter"] = Field(
        "intervention", description="'adapter' keys every block by its adapter, as a LoRA server must (for "
                                    "comparison); 'intervention' shares the blocks no intervention touched")
    max_prompt_tokens: int | None = Field(None, ge=1, description="longest prompt accepted; default: model context")
    max_new_tokens: int = Field(1024, ge=1, description="upper bound on max_tokens per request")
    max_rank: int = Field(64, ge=1, description="largest intervention rank accepted")
    # Training jobs (POST /v1/adapters/train): what one may cost, and what it may take from serving
    max_train_jobs: int = Field(2, ge=1, description="training jobs queued or running at once; more get 429")
    max_train_steps: int = Field(10_000, ge=1, description="optimisation steps (epochs x batches) per job")
    max_train_step_tokens: int = Field(
        16_384, ge=1, description="prompt + completion tokens of a job's largest batch (one optimisation step)"
    )
    train_budget_ms: float | None = Field(
        None, gt=0, le=10_000,
        description="training time per engine iteration while serving; default 40 on CPU, 10 on GPU",
    )
    max_adapter_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="largest upload accepted")
    max_interventions: int = Field(64, ge=1, description="most interventions in one adapter (each costs a Python "
                                                         "step per prefill chunk)")
    max_body_bytes: int = Field(1024 * 1024, ge=1024, description="largest JSON request body")
    adapter_cache_bytes: int = Field(256 * 1024 * 1024, ge=0, description="device memory for resident adapters")
    host_adapter_cache_bytes: int = Field(
        1024 * 1024 * 1024, ge=0, description="host memory for parsed adapters (LRU beyond; re-read from disk)"
    )
    pinned_adapters: list[str] = Field(default_factory=list, description="adapters never evicted from the device")
    drain_seconds: float = Field(30.0, ge=0, description="on SIGTERM, how long in-flight requests may finish")
    scan_interval: float = Field(2.0, ge=0, description="seconds between registry directory scans; 0 = off")
    read_only_registry: bool = Field(False, description="serve and scan the registry, refuse writes with 403")
    allow_runtime_adapter_updates: bool = Field(
        False, description="enable vLLM's POST /v1/load_lora_adapter and /v1/unload_lora_adapter"
    )
    runtime_adapter_root: str | None = Field(
        None, description="the directory whose files /v1/load_lora_adapter may read (required to load)"
    )
    api_key: SecretStr | None = None
    admin_key: SecretStr | None = None
    metrics_key: SecretStr | None = Field(None, description="if set, /metrics needs it as a bearer key")
    allowed_hosts: CommaList = Field(
        None, description="Host names accepted besides localhost and IP addresses ('*.example.com' for subdomains, "
                          "'*' for any); default: any on a network bind, none on a loopback bind")
    allowed_origins: CommaList = Field(
        None, description="Origins (scheme://host[:port]) whose pages may make admin calls besides the server's "
                          "own; '*' for any")
    max_prompt_logprobs: int = Field(
        262_144, ge=1, description="echo with logprobs: most prompt tokens x choices x (logprobs + 1) per request")
    max_grammar_bytes: int = Field(
        64 * 1024, ge=16, description="largest JSON schema, regex, choice list or grammar a request may constrain by")
    grammar_compile_seconds: float = Field(
        10.0, gt=0, description="how long a request waits for its grammar to compile before it is refused")
    grammar_cache_size: int = Field(128, ge=1, description="compiled grammars kept, least recently used evicted")
    log_level: str = "info"

    @field_validator("prefix_block_tokens")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"prefix_block_tokens must be a power of two (a KV slot size), got {value}")
        return value

    @field_validator("allowed_hosts", "allowed_origins", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value
