"""Liveness (`/healthz`) and readiness (`/readyz`: the store and the broker answer)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from api.schemas import Health

router = APIRouter(tags=["health"])
INSTANCE_HEADER = "X-OPSD-Instance"


def _instance_headers(request: Request) -> dict[str, str]:
    """`opsd up` names its API child; the name comes back so it knows who answered."""
    instance = getattr(request.app.state.settings, "instance_id", "")
    return {INSTANCE_HEADER: instance} if instance else {}


@router.get("/healthz", response_model=Health, summary="The process is up")
async def healthz(request: Request, response: Response) -> Health:
    response.headers.update(_instance_headers(request))
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    summary="The store and the broker are reachable",
    responses={503: {"model": Health}},
)
async def readyz(request: Request) -> Any:
    checks = {}
    store_ok = await run_in_threadpool(request.app.state.store.ping)
    checks["store"] = "ok" if store_ok else "unreachable"
    try:
        broker_ok = await run_in_threadpool(request.app.state.broker_ping)
    except Exception:
        broker_ok = False
    checks["broker"] = "ok" if broker_ok else "unreachable"
    ready = store_ok and broker_ok
    body = Health(status="ok" if ready else "unavailable", checks=checks)
    return JSONResponse(
        body.model_dump(), status_code=200 if ready else 503, headers=_instance_headers(request)
    )
