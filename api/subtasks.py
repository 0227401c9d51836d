"""What the routes of a job's sub-tasks (evals, pre-flights) share.

Both are rows in the store that a worker runs from a queue message: the route creates the row,
then sends the message (:func:`enqueue_or_take_back`: a broker that is down leaves nothing
behind and is answered 503); the row's ``progress`` document, written by the worker, is shown
through a response model (:func:`progress_or_none`: a document of an older or newer shape is
left out rather than failing the request).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from api.deps import in_store
from api.errors import APIError

log = logging.getLogger("opsd.api")

M = TypeVar("M", bound=BaseModel)


async def enqueue_or_take_back(
    request: Request,
    kind: str,
    task_id: str,
    send: Callable[[], None],
    discard: Callable[[], bool],
) -> None:
    """Run ``send()`` (the blocking broker call) in the thread pool; if it raises, ``discard()``
    the task's row (a store call: True when it deleted a still-queued, never-started row) and
    answer 503 ``queue_unavailable`` with ``Retry-After: 5``. When the discard finds the row
    started (a worker got it anyway, re-sent by the reaper), return normally: it exists and
    runs. ``kind`` and ``task_id`` name the task in the log line."""
    try:
        await run_in_threadpool(send)
    except Exception as exc:  # broker down: take the task back, answer 503
        log.warning("%s %s: could not enqueue: %s", kind, task_id, exc)
        if await in_store(request, discard):
            raise APIError(
                503,
                "queue_unavailable",
                "the job queue is unavailable; nothing was created, retry later",
                headers={"Retry-After": "5"},
            ) from None


def progress_or_none(model: type[M], progress: dict[str, Any] | None) -> M | None:
    """``progress`` validated as ``model``; ``None`` when it is empty or does not fit."""
    if not progress:
        return None
    try:
        return model.model_validate(progress)
    except ValueError:
        return None
