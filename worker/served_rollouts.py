"""Training rollouts sampled by the inference server (vLLM) instead of in the worker.

`training_rollouts` decides (``OPSD_TRAINING_ROLLOUTS``): ``local`` samples in the worker with
transformers; ``server`` has the server at ``OPSD_INFERENCE_URL`` sample every OPSD/GRPO rollout
(a job whose base model the server does not serve fails with the reason); ``auto`` (default)
uses the server when one is configured and serves the job's base model, else samples locally.
The engine's :class:`~opsd_engine.rollout.ServedRolloutBackend` does the weight syncing; this
module decides, connects and cleans up (:meth:`ServedRollouts.close` unloads the last adapter).
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from opsd_service.settings import ServiceSettings
from worker.inference_client import InferenceClient, InferenceError

log = logging.getLogger("opsd.worker")

SAMPLING_METHODS = ("opsd", "grpo")


class ServedRollouts:
    """A :data:`~opsd_engine.rollout.RolloutFactory` bound to one inference server and one run."""

    def __init__(self, client: InferenceClient, settings: ServiceSettings, job_id: str) -> None:
        self.client = client
        self.adapter_dir = settings.rollout_adapter_dir
        # unique per run: a resumed run must never reuse a name loaded with other weights
        self.run_name = f"{job_id}-rollout-{uuid.uuid4().hex[:8]}"
        self.backend: Any = None

    def __call__(self, view: Any) -> Any:
        from opsd_engine.rollout import ServedRolloutBackend

        self.backend = ServedRolloutBackend(
            self.client, view, adapter_dir=self.adapter_dir, run_name=self.run_name
        )
        return self.backend

    def close(self) -> None:
        try:
            if self.backend is not None:
                self.backend.close()
        finally:
            self.client.close()


def served_rollouts(spec: Any, settings: ServiceSettings, job_id: str) -> ServedRollouts | None:
    """The server-side rollouts for this job, or ``None`` to sample in the worker."""
    mode = settings.training_rollouts
    if mode == "local" or not settings.inference_url or spec.method not in SAMPLING_METHODS:
        return None
    client = InferenceClient(settings.inference_url)
    try:
        served = client.base_model(expected=spec.base_model)
    except InferenceError as exc:
        client.close()
        if mode == "server":
            raise
        log.info("job %s: rollouts sampled in the worker (%s)", job_id, exc)
        return None
    log.info("job %s: rollouts sampled by %s (%s)", job_id, client.base_url, served)
    return ServedRollouts(client, settings, job_id)
