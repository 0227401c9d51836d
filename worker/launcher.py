"""A job of several GPUs on one worker: a child process group, watched by the worker.

The worker does not schedule or launch ranks itself: it starts one child launcher with the job's
spec -- ``python -m torch.distributed.run --nproc_per_node N`` on a CPU worker (N gloo
processes), ``accelerate launch --multi_gpu --num_processes N`` (with accelerate's ``--fsdp_*``
flags for ``runtime.distributed: fsdp``) on a GPU worker -- whose ranks run
`worker.rank_entry` (the engine's ``opsd train --resume`` under the tenant's dataset guard). The
launcher kills the whole group when one rank fails; a hung collective fails within
``OPSD_COLLECTIVE_TIMEOUT_S`` (the engine's timeout, set from the worker's settings).

:func:`run_group` watches the group from the worker's thread while the worker's `LeaseKeeper`
keeps renewing the lease:

* rank 0's files are ingested into the store as they grow (every ``poll`` seconds): rows of
  ``metrics.jsonl`` (a step already sent is not sent again; the store ignores a replayed step),
  events of ``events.jsonl`` written in this launch (a ``checkpoint`` event publishes and records
  the checkpoint it names, ``checkpoint_removed`` forgets one), all through `StoreCallbacks`;
* when the job must stop (cancel, wall-time limit, worker shutdown, store away for a lease) the
  stop file is created first -- every rank stops at its next poll with a checkpoint -- and the
  group is terminated (SIGTERM, then SIGKILL, to its process group) only after
  ``launch_stop_grace_seconds``; a lost lease kills it at once;
* when it ends: status 0 is the engine's result (succeeded, or cancelled = stopped); a rank's
  error file with a user error (bad dataset, spec, model) is a readable failure
  (:class:`GroupFailed`); any other end -- a rank killed, a system error on a rank (the
  collective its lost peer broke), a collective timeout -- is :class:`RankLost`, which the
  runner turns into a requeue of the whole job (it resumes from its last checkpoint, exactly)
  until its attempts are spent.

The group runs in its own session (``start_new_session``), so no rank outlives the job: every
way out of :func:`run_group` kills what is left of the group, and a worker killed outright takes
its group with it (the launcher gets SIGTERM when its parent dies: `worker.die_with_parent`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobstore.records import JobError
from opsd_service.settings import ServiceSettings

log = logging.getLogger("opsd.worker")

LAUNCH_DIR = ".launch"  # beside the run's files, never published
POLL_SECONDS = 0.5
KILL_WAIT_SECONDS = 10.0


class GroupFailed(Exception):
    """A rank reported a readable error (its `JobError`): the job fails with it."""

    def __init__(self, error: JobError) -> None:
        super().__init__(error.message)
        self.error = error


class RankLost(Exception):
    """A rank ended without a result or an error of its own: the group is lost as a whole."""


@dataclass(frozen=True)
class GroupResult:
    """What rank 0 reported (the fields of the engine's `TrainResult` the runner reads)."""

    status: str  # "succeeded" | "cancelled"
    step: int
    adapter_dir: Path | None


def uses_cuda(spec: Any) -> bool:
    """Whether the job's ranks run on GPUs (``runtime.device`` auto: when this host has one)."""
    if spec.runtime.device == "cpu":
        return False
    if spec.runtime.device == "cuda":
        return True
    import torch

    return bool(torch.cuda.is_available())


def rendezvous_port(settings: ServiceSettings) -> int | None:
    """A free port of ``launch_ports`` (``LOW-HIGH``) for the group's rendezvous; None: let
    ``torchrun --standalone`` / accelerate pick one."""
    if not settings.launch_ports:
        return None
    low, high = (int(part) for part in settings.launch_ports.split("-"))
    for port in range(low, high + 1):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free rendezvous port in {settings.launch_ports}")


def launch_command(
    spec: Any,
    *,
    processes: int,
    cuda: bool,
    port: int | None,
    rank_args: list[str],
) -> list[str]:
    """The launcher's command line for ``processes`` ranks running ``worker.rank_entry``.

    CPU: ``torch.distributed.run`` (``accelerate launch --cpu`` cannot start several processes
    without MPI). GPU: ``accelerate launch --multi_gpu``, plus ``--use_fsdp`` and the spec's
    ``runtime.fsdp_config`` as accelerate's ``--fsdp_*`` flags for ``distributed: fsdp``.
    """
    entry = ["-m", "worker.rank_entry", *rank_args]
    if not cuda:
        where = ["--master_addr=127.0.0.1", f"--master_port={port}"] if port else ["--standalone"]
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=1",
            f"--nproc_per_node={processes}",
            "--max_restarts=0",
            *where,
            *entry,
        ]
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        f"--num_processes={processes}",
        "--num_machines=1",
        "--max_restarts=0",
    ]
    if port:
        command.append(f"--main_process_port={port}")
    if spec.runtime.distributed == "fsdp":
        from opsd_engine.config import FSDPConfig

        options = spec.runtime.fsdp_config or FSDPConfig()
        command.append("--use_fsdp")
        for name, value in options.model_dump().items():
            if value is None:
                continue
            text = str(value).lower() if isinstance(value, bool) else str(value)
            command.append(f"--{name}={text}")
    return [*command, *entry]


def _kill_group(process: subprocess.Popen[bytes], *, grace: float = 0.0) -> None:
    """End every process of the group: SIGTERM (after ``grace`` seconds of waiting), then
    SIGKILL after :data:`KILL_WAIT_SECONDS`."""
    if grace > 0:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)
    for sig, wait in ((signal.SIGTERM, KILL_WAIT_SECONDS), (signal.SIGKILL, KILL_WAIT_SECONDS)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError, PermissionError):  # ranks left behind
        os.killpg(process.pid, signal.SIGKILL)


class _Tail:
    """The complete lines a file gained since the last read (starts over when it is replaced
    or shrinks, as a resume that truncates ``metrics.jsonl`` does)."""

    def __init__(self, path: Path, *, from_end: bool) -> None:
        self.path, self.offset, self.inode = path, 0, None
        if from_end and path.exists():
            stat = path.stat()
            self.offset, self.inode = stat.st_size, stat.st_ino

    def lines(self) -> list[str]:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return []
        if stat.st_ino != self.inode or stat.st_size < self.offset:
            self.offset, self.inode = 0, stat.st_ino
        if stat.st_size == self.offset:
            return []
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            chunk = handle.read()
        end = chunk.rfind(b"\n") + 1  # a line being written stays for the next read
        self.offset += end
        return [line for line in chunk[:end].decode().splitlines() if line.strip()]


class _Ingest:
    """Rank 0's files into the store through the job's `StoreCallbacks`."""

    def __init__(self, run_dir: Path, callbacks: Any) -> None:
        self.callbacks = callbacks
        self.metrics = _Tail(run_dir / "metrics.jsonl", from_end=False)
        self.events = _Tail(run_dir / "events.jsonl", from_end=True)  # older launches' are in
        self.sent_steps: set[int] = set()

    def __call__(self) -> None:
        for line in self.metrics.lines():
            row = json.loads(line)
            step = int(row.pop("step"))
            if step not in self.sent_steps:
                self.sent_steps.add(step)
                self.callbacks.on_metrics(step, row)
        for line in self.events.lines():
            event = json.loads(line)
            kind, message, data = event["kind"], event["message"], event.get("data") or {}
            if kind == "checkpoint":
                path = Path(data["path"])
                if path.is_dir():  # else: already removed again (checkpoint.keep_last)
                    self.callbacks.on_checkpoint(int(data["step"]), path)
            elif kind == "checkpoint_removed":
                self.callbacks.on_checkpoint_removed(int(data["step"]), Path(data["path"]))
            else:
                self.callbacks.on_event(kind, message, data)


def write_guard(path: Path, settings: ServiceSettings, tenant: str, files: dict[str, str]) -> None:
    """The tenant's dataset guard for `worker.rank_entry`: the policy, the tenant's name and the
    locations of the job's uploaded files (the ranks never ask the store)."""
    data = {
        "datasets": settings.dataset_uri_policy,
        "base_models": settings.base_model_policy,
        "private_hosts": settings.dataset_private_hosts,
        "tenant": tenant,
        "files": files,
    }
    path.write_text(json.dumps(data))
    path.chmod(0o600)


def run_group(
    spec: Any,
    run_dir: Path,
    *,
    callbacks: Any,
    settings: ServiceSettings,
    tenant: str,
    files: dict[str, str],
    lease: Any,
    poll: float = POLL_SECONDS,
) -> GroupResult:
    """Run the job as ``spec.resources.gpus`` ranks and watch them until the group ends.

    Returns rank 0's result; raises :class:`GroupFailed` (a rank's readable error),
    :class:`RankLost` (the group ended otherwise) or `JobError`-carrying GroupFailed for a
    request this worker cannot serve (FSDP without GPUs).
    """
    from opsd_engine.config import spec_to_dict

    processes = spec.resources.gpus
    cuda = uses_cuda(spec)
    if spec.runtime.distributed == "fsdp" and not cuda:
        raise GroupFailed(
            JobError(
                "unsupported_resources",
                "runtime.distributed: fsdp runs on GPU workers; this job was given CPU "
                "processes (use ddp, or a GPU worker class)",
                "user",
            )
        )
    if cuda:
        import torch

        if (visible := torch.cuda.device_count()) < processes:  # a worker set up wrongly
            raise GroupFailed(
                JobError(
                    "insufficient_devices",
                    f"the worker sees {visible} GPU(s) and the job needs {processes}; the "
                    "deployment's worker is misconfigured (CUDA_VISIBLE_DEVICES, --gpus)",
                    "system",
                )
            )
    launch = run_dir / LAUNCH_DIR
    shutil.rmtree(launch, ignore_errors=True)
    launch.mkdir(parents=True)
    spec_file, stop_file, errors = launch / "spec.json", launch / "stop", launch / "errors"
    spec_file.write_text(json.dumps(spec_to_dict(spec)))
    guard_file = launch / "guard.json"
    write_guard(guard_file, settings, tenant, files)
    rank_args = [
        str(spec_file),
        "--out",
        str(run_dir),
        "--stop-file",
        str(stop_file),
        "--error-dir",
        str(errors),
        "--guard",
        str(guard_file),
    ]
    command = launch_command(
        spec, processes=processes, cuda=cuda, port=rendezvous_port(settings), rank_args=rank_args
    )
    env = {
        **os.environ,
        "OPSD_COLLECTIVE_TIMEOUT_S": str(settings.collective_timeout_s),
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.setdefault("OMP_NUM_THREADS", "1")
    ingest = _Ingest(run_dir, callbacks)
    log.info("job %s: launching %s ranks: %s", callbacks.job_id, processes, " ".join(command))
    callbacks.on_event(
        "launched",
        f"started {processes} processes ({'GPU' if cuda else 'CPU'}, {spec.runtime.distributed})",
        {"processes": processes, "distributed": spec.runtime.distributed, "cuda": cuda},
    )
    with open(launch / "stdout.log", "wb") as out, open(launch / "stderr.log", "wb") as err:
        process = subprocess.Popen(
            # ended when this worker dies, whatever kills it
            [sys.executable, "-m", "worker.die_with_parent", str(os.getpid()), *command],
            cwd=run_dir,
            env=env,
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # one process group: stopped and killed as a unit
        )
    job_id, grace = callbacks.job_id, settings.launch_stop_grace_seconds
    stop_sent: float | None = None
    try:
        while process.poll() is None:
            ingest()
            if lease.lost.is_set():  # another worker owns the job: stop writing, stop at once
                _kill_group(process)
                break
            if stop_sent is None and callbacks.should_stop():
                stop_file.touch()
                stop_sent = time.monotonic()
                log.info("job %s: asked the group to stop", job_id)
            if stop_sent is not None and time.monotonic() - stop_sent > grace:
                log.warning("job %s: the group did not stop in time; ending it", job_id)
                _kill_group(process)
                break
            time.sleep(poll)
        ingest()
    finally:
        if process.poll() is None or _group_alive(process.pid):
            _kill_group(process)
    return _outcome(process.returncode, launch, errors, stopped=stop_sent is not None)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _outcome(code: int | None, launch: Path, errors: Path, *, stopped: bool) -> GroupResult:
    reports = sorted(errors.glob("error-rank*.json")) if errors.is_dir() else []
    for report in reports:  # a user's mistake fails the job; any rank may be the one to see it
        error = json.loads(report.read_text())
        if error["category"] == "user":
            raise GroupFailed(JobError(error["code"], error["message"], error["category"]))
    # A system error on a rank (a collective broken by a lost peer, a device lost) ends the
    # group like a killed rank: the job is retried as a whole, within its attempts.
    result = None
    for line in reversed((launch / "stdout.log").read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            try:
                result = json.loads(line)
            except ValueError:
                continue
            break
    if code == 0 and result is not None:
        adapter = result.get("adapter")
        return GroupResult(
            result["status"], int(result["step"]), Path(adapter) if adapter else None
        )
    if stopped:  # ended by force after the stop file: what was checkpointed is kept
        return GroupResult("cancelled", 0, None)
    tail = (launch / "stderr.log").read_text(errors="replace")[-2000:]
    log.warning("process group ended with status %s; its last output:\n%s", code, tail)
    raise RankLost(f"a process of the job's group ended unexpectedly (status {code})")
