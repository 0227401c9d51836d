"""Jobs of several GPUs through the worker (issue 14): a `resources.gpus: 2` job on a worker
started with 2 devices and no GPU runs as a real 2-process gloo group (`torchrun`), watched by
the worker's runner, on a real Postgres store.

What must hold: the same metrics and, within fp32 reduction tolerance, the same adapter as the
1-GPU job at the same global batch, every step recorded once; a rank killed mid-run requeues the
job as one unit, which resumes exactly once and ends equal to the uninterrupted run; a cancel
stops every rank (stop file first) and leaves no process behind.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.worker.helpers import create_job, wait_for
from worker.runner import REQUEUED, run_job

TIMEOUT_S = 300  # one launch on a slow, shared CI machine; never reached when things work
TIMING = ("time_", "tokens_per_s")


@pytest.fixture
def database_url(postgres_url: str) -> str:  # one backend: these tests launch processes
    from jobstore.migrate import upgrade

    upgrade(postgres_url)
    return postgres_url


@pytest.fixture
def worker_settings(settings: Any) -> Any:
    """A worker of 2 devices (CPU: 2 gloo processes), rendezvous ports in the tests' range."""
    return settings.model_copy(
        update={"worker_gpus": 2, "launch_ports": "16400-16499", "launch_stop_grace_seconds": 60}
    )


def _run_in_thread(**kwargs: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["result"] = run_job(**kwargs)
        except BaseException as exc:  # surfaced by the test
            out["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def _ranks(job_id: str) -> dict[int, int]:
    """LOCAL_RANK -> pid of the live rank processes of the job's group."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().decode(errors="replace")
            if "worker.rank_entry" not in command or job_id not in command:
                continue
            if (entry / "stat").read_text().split()[2] == "Z":
                continue  # a zombie is no rank
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in environ:
            if item.startswith(b"LOCAL_RANK="):
                found[int(item.split(b"=", 1)[1])] = int(entry.name)
    return found


def _adapter(job: Any) -> dict[str, torch.Tensor]:
    return load_file(str(Path(job.adapter_uri) / "adapter_model.safetensors"))


def _two_gpu_spec(tiny_spec_dict: Any, **overrides: Any) -> dict[str, Any]:
    """The 1-GPU spec's global batch (2 x 2) as 1 per process x 2 accumulation x 2 processes."""
    optim = {"batch_size": 1, "grad_accum": 2, "max_steps": 3, **overrides.pop("optim", {})}
    return tiny_spec_dict(resources={"gpus": 2}, optim=optim, checkpoint_every=1, **overrides)


@pytest.fixture
def straight_two_gpu_job(store: Any, worker_settings: Any, tiny_spec_dict: Any) -> Any:
    job_id = create_job(store, _two_gpu_spec(tiny_spec_dict))
    outcome = run_job(job_id, store=store, settings=worker_settings, worker_id="w-straight")
    assert outcome == "succeeded", store.list_events(job_id)[-3:]
    return store.get_job(job_id)


def test_a_two_gpu_job_equals_the_one_gpu_job(
    store: Any, worker_settings: Any, tiny_spec_dict: Any, straight_two_gpu_job: Any
) -> None:
    one_id = create_job(store, tiny_spec_dict(checkpoint_every=1))
    assert run_job(one_id, store=store, settings=worker_settings, worker_id="w1") == "succeeded"
    one, two = store.get_job(one_id), straight_two_gpu_job

    assert (two.progress_step, two.total_steps) == (3, 3)
    a, b = store.query_metrics(one.id), store.query_metrics(two.id)
    assert a.keys() == b.keys()
    for name, points in a.items():
        assert [s for s, _ in b[name]] == [s for s, _ in points] == [1, 2, 3], name  # once each
        if name.startswith(TIMING):
            continue
        for (_, x), (_, y) in zip(points, b[name], strict=True):
            assert y == pytest.approx(x, rel=1e-4, abs=1e-7), name
    x, y = _adapter(one), _adapter(two)
    assert x.keys() == y.keys()
    for key in x:
        torch.testing.assert_close(y[key], x[key], rtol=1e-4, atol=1e-5)
    # rank 0 alone reported: one launch, one start naming 2 processes, every checkpoint once
    events = store.list_events(two.id)
    kinds = [e.kind for e in events]
    assert kinds.count("launched") == 1 and kinds.count("started") == 1
    started = next(e for e in events if e.kind == "started")
    assert started.data["processes"] == 2
    assert [c.step for c in store.list_checkpoints(two.id)] == [1, 2, 3]
    assert _ranks(two.id) == {}


def test_a_lost_rank_requeues_the_job_which_resumes_exactly_once(
    store: Any, worker_settings: Any, tiny_spec_dict: Any, straight_two_gpu_job: Any
) -> None:
    job_id = create_job(store, _two_gpu_spec(tiny_spec_dict))
    thread, out = _run_in_thread(
        job_id=job_id, store=store, settings=worker_settings, worker_id="w-a"
    )
    wait_for(lambda: store.list_checkpoints(job_id), timeout=TIMEOUT_S, what="a checkpoint")
    ranks = wait_for(lambda: _ranks(job_id), timeout=10, what="the ranks")
    os.kill(ranks[1], signal.SIGKILL)  # rank 1 dies mid-run: the group is lost as a whole
    thread.join(TIMEOUT_S)
    assert out.get("result") == REQUEUED, out
    wait_for(lambda: not _ranks(job_id), timeout=15, what="no rank left")
    job = store.get_job(job_id)
    assert job.status == "queued" and job.attempt == 2 and job.lease_owner is None
    requeued = [e for e in store.list_events(job_id) if e.kind == "requeued"]
    assert len(requeued) == 1 and requeued[0].data["error"]["code"] == "rank_lost"

    # the next turn (here: another worker) resumes it from its last checkpoint
    assert run_job(job_id, store=store, settings=worker_settings, worker_id="w-b") == "succeeded"
    job = store.get_job(job_id)
    assert job.attempt == 2
    metrics = store.query_metrics(job_id)
    assert all([s for s, _ in points] == [1, 2, 3] for points in metrics.values())
    resumed = [e for e in store.list_events(job_id) if e.kind == "started"]
    assert len(resumed) == 2 and resumed[-1].data["start_step"] >= 1
    straight = _adapter(straight_two_gpu_job)
    for key, value in _adapter(job).items():
        assert torch.equal(value, straight[key]), key


def test_cancel_stops_every_rank_of_the_group(
    store: Any, worker_settings: Any, tiny_spec_dict: Any
) -> None:
    job_id = create_job(store, _two_gpu_spec(tiny_spec_dict, optim={"max_steps": 200}))
    thread, out = _run_in_thread(
        job_id=job_id, store=store, settings=worker_settings, worker_id="w-c"
    )
    wait_for(lambda: store.query_metrics(job_id), timeout=TIMEOUT_S, what="a first step")
    assert len(wait_for(lambda: _ranks(job_id), timeout=10, what="the ranks")) == 2
    assert store.request_cancel(job_id) is not None
    thread.join(TIMEOUT_S)
    assert out.get("result") == "cancelled", out
    assert _ranks(job_id) == {}
    job = store.get_job(job_id)
    assert job.status == "cancelled" and job.progress_step < 200
    # stopped by the stop file: rank 0 saved the last step, and it was recorded
    assert max(c.step for c in store.list_checkpoints(job_id)) == job.progress_step
    assert [e.kind for e in store.list_events(job_id)][-2:] == ["cancelling", "cancelled"] or (
        "cancelled" in [e.kind for e in store.list_events(job_id)]
    )
