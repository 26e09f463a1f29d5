"""Adapter registry endpoints: upload, list, describe, delete, and the files not served (HTTP only)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, File, Form, Query, Request, Response, UploadFile
from pydantic import BaseModel, Field

from server.api.dependencies import require_admin, require_api_key, require_serving
from server.api.protocol import AdapterDescription, AdapterList, ErrorResponse
from server.api.serving import Serving
from server.registry import AdapterRecord
from server.torch_threads import in_own_thread

router = APIRouter(prefix="/v1/adapters", tags=["adapters"])
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 409, 413, 422, 503)}
# OpenAPI links: what a client (and schemathesis' stateful tests) can do next with an uploaded adapter.
_NAME = {"name": "$response.body#/name"}
UPLOAD_LINKS = {
    "GetAdapter": {"operationId": "get_adapter_v1_adapters__name__get", "parameters": _NAME},
    "DeleteAdapter": {"operationId": "delete_adapter_v1_adapters__name__delete", "parameters": _NAME},
    "CompleteWithAdapter": {"operationId": "completions_v1_completions_post",
                            "requestBody": {"model": "$response.body#/name", "prompt": "Hello", "max_tokens": 1}},
}


@router.post(
    "", status_code=201, response_model=AdapterDescription, responses={**ERRORS, 201: {"links": UPLOAD_LINKS}},
    dependencies=[Depends(require_admin)],
)
async def upload_adapter(
    request: Request,
    name: str = Form(..., description="a letter or digit, then letters, digits, '-', '_', '.'; at most 64"),
    file: UploadFile = File(..., description="native .safetensors, or a .zip / .tar.gz of a pyreft save directory"),
    positions: str | None = Form(None, description="pyreft archives only: e.g. f3+l3"),
    share_weights: bool = Form(False, description="pyreft archives only"),
    replace: bool = Query(False, description="replace an existing adapter atomically"),
    replace_form: bool | None = Form(None, alias="replace"),
    serving: Serving = Depends(require_serving),
) -> AdapterDescription:
    replace = replace or bool(replace_form)
    serving.new_adapter_name(name, replace)
    registry = serving.registry
    data = await file.read(registry.max_adapter_bytes + 1)

    def store() -> AdapterRecord:
        return registry.put(name, registry.parse_upload(data, positions, share_weights), replace)

    record = await in_own_thread(store)
    request.state.access = {"adapter": name, "upload_bytes": len(data)}
    return AdapterDescription(**record.describe())


@router.get("", response_model=AdapterList, responses=ERRORS, dependencies=[Depends(require_api_key)])
def list_adapters(
    limit: int = Query(100, ge=1, le=1000), after: str | None = Query(None, description="page after this name"),
    serving: Serving = Depends(require_serving),
) -> AdapterList:
    records = serving.registry.list(limit=limit + 1, after=after)
    page = records[:limit]
    return AdapterList(
        data=[AdapterDescription(**r.describe()) for r in page], has_more=len(records) > limit,
        next_after=page[-1].name if len(records) > limit else None,
    )


class RejectedFileDescription(BaseModel):
    name: str = Field(description="the adapter name the file would have")
    path: str = Field(description="the file, as this server sees it")
    reason: str = Field(description="why it is not served")
    size: int = Field(description="its size in bytes when it was judged")
    when: float = Field(description="when it was judged (Unix time); it is judged again once it changes")


class RejectedFileList(BaseModel):
    object: str = "list"
    data: list[RejectedFileDescription]


# "-" cannot begin an adapter name, so this path can never be taken for GET /v1/adapters/{name}.
@router.get("/-/rejected", response_model=RejectedFileList, responses=ERRORS, dependencies=[Depends(require_admin)])
def list_rejected_files(serving: Serving = Depends(require_serving)) -> RejectedFileList:
    """Files in the registry directory that this server does not serve, and why (admin only)."""
    return RejectedFileList(data=[RejectedFileDescription(**r.describe()) for r in serving.registry.rejected()])


@router.get("/{name}", response_model=AdapterDescription, responses=ERRORS, dependencies=[Depends(require_api_key)])
def get_adapter(name: str, serving: Serving = Depends(require_serving)) -> AdapterDescription:
    return AdapterDescription(**serving.registry.get(name).describe())


@router.delete("/{name}", status_code=204, responses=ERRORS, dependencies=[Depends(require_admin)])
async def delete_adapter(name: str, serving: Serving = Depends(require_serving)) -> Response:
    await asyncio.to_thread(serving.registry.delete, name)
    return Response(status_code=204)
