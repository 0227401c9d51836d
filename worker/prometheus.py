"""Prometheus metrics of a worker process, served on `OPSD_WORKER_METRICS_PORT` (prometheus-client).

Exported (in the process's default registry; one worker per process):

* ``opsd_worker_steps_total``, ``opsd_worker_generated_tokens_total``: optimizer steps done and
  tokens sampled by this worker (``rate()`` gives steps/s and tokens/s over any window);
* ``opsd_worker_steps_per_second``, ``opsd_worker_tokens_per_second``: the last step's pace;
* ``opsd_worker_busy`` and ``opsd_worker_current_job{job_id,kind}`` (1 while it runs; ``kind`` is
  ``job`` or ``eval``);
* ``opsd_worker_lease_renewals_total{result}``: lease renewals (``ok``, ``lost``, ``error``);
* ``opsd_worker_gpu_memory_bytes{device,kind}``: CUDA memory allocated and reserved by this
  process, when torch sees a GPU (read at scrape time).

The runner calls the small functions below; nothing here imports torch or the engine.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Iterator, Mapping

from prometheus_client import REGISTRY, Counter, Gauge, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger("opsd.worker")

STEPS = Counter("opsd_worker_steps", "Optimizer steps completed by this worker.")
GENERATED_TOKENS = Counter(
    "opsd_worker_generated_tokens", "Tokens sampled (rollouts) by this worker."
)
STEPS_PER_SECOND = Gauge("opsd_worker_steps_per_second", "Pace of the last optimizer step.")
TOKENS_PER_SECOND = Gauge(
    "opsd_worker_tokens_per_second", "Tokens per second of the last optimizer step."
)
BUSY = Gauge("opsd_worker_busy", "1 while this worker runs a job or an eval.")
CURRENT_JOB = Gauge(
    "opsd_worker_current_job", "1 for the job or eval this worker runs.", ["job_id", "kind"]
)
LEASE_RENEWALS = Counter(
    "opsd_worker_lease_renewals", "Lease renewals of running jobs and evals.", ["result"]
)


def job_started(record_id: str, kind: str) -> None:
    """This worker now runs `record_id` (a job or an eval)."""
    CURRENT_JOB.clear()
    CURRENT_JOB.labels(record_id, kind).set(1)
    BUSY.set(1)


def job_finished() -> None:
    CURRENT_JOB.clear()
    BUSY.set(0)
    STEPS_PER_SECOND.set(0)
    TOKENS_PER_SECOND.set(0)


def observe_step(metrics: Mapping[str, float]) -> None:
    """One optimizer step's metrics as the engine reports them (`time_step_s`,
    `generated_tokens`, `tokens_per_s`)."""
    STEPS.inc()
    tokens = metrics.get("generated_tokens")
    if isinstance(tokens, int | float) and math.isfinite(tokens) and tokens > 0:
        GENERATED_TOKENS.inc(tokens)
    seconds = metrics.get("time_step_s")
    if isinstance(seconds, int | float) and math.isfinite(seconds) and seconds > 0:
        STEPS_PER_SECOND.set(1.0 / seconds)
    pace = metrics.get("tokens_per_s")
    if isinstance(pace, int | float) and math.isfinite(pace):
        TOKENS_PER_SECOND.set(pace)


def lease_renewed(result: str) -> None:
    """`ok` (renewed), `lost` (another worker owns it now) or `error` (store unreachable)."""
    LEASE_RENEWALS.labels(result).inc()


class GpuMemory(Collector):
    """CUDA memory of this process per device, read when scraped (only if torch is loaded)."""

    def collect(self) -> Iterator[Metric]:
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available():
            return
        family = GaugeMetricFamily(
            "opsd_worker_gpu_memory_bytes",
            "CUDA memory of this worker process.",
            labels=["device", "kind"],
        )
        for index in range(torch.cuda.device_count()):
            family.add_metric([str(index), "allocated"], torch.cuda.memory_allocated(index))
            family.add_metric([str(index), "reserved"], torch.cuda.memory_reserved(index))
        yield family

    def describe(self) -> list[Metric]:
        return []


REGISTRY.register(GpuMemory())


def serve(host: str, port: int) -> None:
    """Serve `GET /metrics` of this process on `host:port` from a daemon thread."""
    start_http_server(port, addr=host)
    log.info("worker metrics on http://%s:%s/metrics", host, port)
