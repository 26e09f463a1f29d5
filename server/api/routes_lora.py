"""vLLM's runtime adapter endpoints, for platform tools that drive them (HTTP only).

`POST /v1/load_lora_adapter {"lora_name", "lora_path"}` stores the adapter at `lora_path` (a native
`.safetensors` file, or a pyreft save directory with `positions`) in the registry under
`lora_name`; `POST /v1/unload_lora_adapter {"lora_name"}` removes it. The registry is shared, so
one call reaches every replica on the same directory. As in vLLM, the endpoints exist only when
enabled (`REFT_ALLOW_RUNTIME_ADAPTER_UPDATES`, vLLM's `VLLM_ALLOW_RUNTIME_LORA_UPDATING`): 404
otherwise. Status codes are vLLM's: 200 with a plain-text message, 400 for bad input or a name
already loaded (unless `load_inplace`), 404 for an unknown adapter or a path that does not exist.
A path is read only under `REFT_RUNTIME_ADAPTER_ROOT`, after resolving links.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from server.api.dependencies import require_admin, require_serving
from server.api.protocol import ErrorResponse
from server.api.serving import Serving, ServingError
from server.config import Settings
from server.registry import AdapterExists, UnknownAdapter
from server.torch_threads import in_own_thread

router = APIRouter(tags=["adapters"])
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 413, 422, 503)}


class LoadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # vLLM's other fields (lora_int_id, ...) mean nothing here

    lora_name: str = Field("", description="the adapter's name in the registry")
    lora_path: str = Field("", description="native .safetensors file or pyreft save directory, under the allowed root")
    load_inplace: bool = Field(False, description="replace an adapter of that name (vLLM's field)")
    positions: str | None = Field(None, description="pyreft directories only: e.g. f3+l3 (extension)")
    share_weights: bool = Field(False, description="pyreft directories only (extension)")


class UnloadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lora_name: str = Field("", description="the adapter to remove from the registry")


def require_runtime_updates(request: Request) -> Settings:
    settings: Settings = request.app.state.reft.settings
    if not settings.allow_runtime_adapter_updates:
        raise ServingError(404, "runtime adapter updates are off; start the server with "
                                "REFT_ALLOW_RUNTIME_ADAPTER_UPDATES=1 to enable this endpoint", "not_found_error")
    return settings


def allowed_path(settings: Settings, lora_path: str) -> Path:
    """`lora_path` (relative ones from the root) with links resolved, if it lies under the allowed root."""
    if settings.runtime_adapter_root is None:
        raise ServingError(400, "no directory is allowed for lora_path: set REFT_RUNTIME_ADAPTER_ROOT")
    if "\0" in lora_path:  # no path holds one; os.path would raise ValueError
        raise ServingError(400, f"lora_path holds a NUL byte at offset {lora_path.index(chr(0))}; no file is named so")
    root = Path(os.path.realpath(settings.runtime_adapter_root))
    path = Path(os.path.realpath(root / lora_path))
    if path != root and root not in path.parents:
        raise ServingError(400, f"lora_path {lora_path!r} is outside the allowed directory {str(root)!r}")
    if not path.exists():
        raise ServingError(404, f"no adapter found at lora_path {lora_path!r}", "not_found_error")
    return path


@router.post(
    "/v1/load_lora_adapter", response_class=PlainTextResponse, responses=ERRORS,
    dependencies=[Depends(require_runtime_updates), Depends(require_admin)],
)
async def load_lora_adapter(
    body: LoadLoraAdapterRequest, request: Request, serving: Serving = Depends(require_serving)
) -> PlainTextResponse:
    settings: Settings = request.app.state.reft.settings
    if not body.lora_name or not body.lora_path:
        raise ServingError(400, "both 'lora_name' and 'lora_path' must be given")
    loaded = f"the lora adapter {body.lora_name!r} has already been loaded; set 'load_inplace' to true to replace it"
    name = serving.new_adapter_name(body.lora_name, body.load_inplace, ServingError(400, loaded))
    registry = serving.registry
    path = allowed_path(settings, body.lora_path)

    def store() -> None:
        registry.put(name, registry.parse_path(path, body.positions, body.share_weights), body.load_inplace)

    try:
        await in_own_thread(store)
    except AdapterExists:
        raise ServingError(400, loaded) from None
    request.state.access = {"adapter": name}
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@router.post(
    "/v1/unload_lora_adapter", response_class=PlainTextResponse, responses=ERRORS,
    dependencies=[Depends(require_runtime_updates), Depends(require_admin)],
)
async def unload_lora_adapter(
    body: UnloadLoraAdapterRequest, request: Request, serving: Serving = Depends(require_serving)
) -> PlainTextResponse:
    if not body.lora_name:
        raise ServingError(400, "'lora_name' must be given to unload an adapter")
    try:
        await in_own_thread(serving.registry.delete, body.lora_name)
    except UnknownAdapter:
        raise ServingError(404, f"the lora adapter {body.lora_name!r} cannot be found", "not_found_error") from None
    request.state.access = {"adapter": body.lora_name}
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
