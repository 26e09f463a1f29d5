"""Training jobs: start one, follow it, cancel it (HTTP only; the work is in server/training_jobs.py)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response

from server.api.dependencies import require_admin, require_serving
from server.api.errors import ERROR_TYPES
from server.api.protocol import ErrorResponse, TrainJob, TrainRequest
from server.api.serving import Serving, ServingError
from server.positions import Positions
from server.torch_threads import in_own_thread
from server.train import TrainConfig
from server.training_jobs import JobError

router = APIRouter(prefix="/v1/adapters/train", tags=["training"], dependencies=[Depends(require_admin)])
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 409, 413, 422, 429, 503)}


@router.post("", status_code=202, response_model=TrainJob, responses=ERRORS)
async def start_training(req: TrainRequest, serving: Serving = Depends(require_serving)) -> TrainJob:
    """Train an adapter on the served base model in the background; it is registered when done."""
    if serving.registry.read_only:
        raise ServingError(403, "this replica's registry is read-only; train through a writable replica",
                           "permission_error")
    serving.new_adapter_name(req.name, req.replace)
    try:
        Positions.parse(req.positions)
    except ValueError as exc:
        raise ServingError(400, f"positions: {exc}") from None
    config = TrainConfig(kind=req.type, layers=tuple(req.layers) if req.layers else None, positions=req.positions,
                         share_weights=req.share_weights, rank=req.rank, epochs=req.epochs, lr=req.lr,
                         batch_size=req.batch_size, seed=req.seed)
    try:
        job = await in_own_thread(serving.training.start, req.name, req.data, config, req.replace)
    except JobError as exc:
        raise ServingError(exc.status, str(exc), ERROR_TYPES[exc.status]) from None
    return TrainJob(**job.describe())


@router.get("/{job_id}", response_model=TrainJob, responses=ERRORS)
def get_training(job_id: str, serving: Serving = Depends(require_serving)) -> TrainJob:
    return TrainJob(**_job(serving, job_id).describe())


@router.get("/{job_id}/adapter", response_class=Response, responses={
    200: {"content": {"application/octet-stream": {}}, "description": "the trained adapter (native safetensors)"},
    **ERRORS,
})
def get_trained_adapter(job_id: str, serving: Serving = Depends(require_serving)) -> Response:
    """The trained adapter's file, once training is over (kept when its name changed meanwhile: `conflict`)."""
    job = _job(serving, job_id)
    if job.result is None:
        raise ServingError(404, f"training job {job_id!r} has no trained adapter (it is {job.status})",
                           "not_found_error")
    return Response(job.result, media_type="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{job.name}.safetensors"'})


@router.delete("/{job_id}", response_model=TrainJob, responses=ERRORS)
def cancel_training(job_id: str, serving: Serving = Depends(require_serving)) -> TrainJob:
    """Cancel a job: it stops before its next step and registers nothing (a finished job is left as it is)."""
    _job(serving, job_id)
    return TrainJob(**serving.training.cancel(job_id).describe())


def _job(serving: Serving, job_id: str):  # noqa: ANN202 - a TrainingJob
    job = serving.training.get(job_id)
    if job is None:
        raise ServingError(404, f"training job {job_id!r} does not exist (jobs do not survive a restart)",
                           "not_found_error")
    return job
