"""What a job may ask of the deployment's workers (`resources`), and sending it to its class.

`check_resources` refuses (422 naming the field) a `resources.gpus` no configured resource class
offers (`OPSD_RESOURCE_CLASSES`), and FSDP on a single device; `enqueue_routed` sends the job's
message to the queue of its class (`worker.queue.enqueue_job`).
"""

from __future__ import annotations

from typing import Any

from api.errors import APIError
from worker.queue import job_gpus

__all__ = ["check_resources", "enqueue_routed", "job_gpus"]


def check_resources(spec: Any, settings: Any) -> None:
    """APIError 422 (`param` = the field) unless some worker class can run ``spec``."""
    classes = settings.gpu_classes()
    gpus = spec.resources.gpus
    if gpus not in classes:
        offered = ", ".join(str(n) for n in classes)
        raise APIError(
            422,
            "invalid_request",
            f"resources.gpus: no worker of this deployment runs a job on {gpus} GPU(s); "
            f"the classes offered are {offered}",
            "resources.gpus",
        )
    if spec.runtime.distributed == "fsdp" and gpus < 2:
        raise APIError(
            422,
            "invalid_request",
            "runtime.distributed: fsdp shards the model over several GPUs; ask for "
            "resources.gpus >= 2 or use ddp",
            "runtime.distributed",
        )


def enqueue_routed(state: Any, job_id: str, gpus: int) -> None:
    """Send the job's message to its class's queue.

    The app's own sender takes the class (`create_app` marks it `enqueue_routes`); a sender
    injected by a test takes the job id only."""
    if getattr(state, "enqueue_routes", False):
        state.enqueue(job_id, gpus)
    else:
        state.enqueue(job_id)
