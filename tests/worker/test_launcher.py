"""The process-group launcher's pieces that need no group (issue 14): the command line of each
worker kind (accelerate's own parser reads the GPU one, FSDP options included), the rendezvous
port range, and ingesting rank 0's files (a replaced `metrics.jsonl` is read again, a line being
written waits, events of earlier launches are not sent again)."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest

from opsd_engine.config import parse_spec
from opsd_service.settings import ServiceSettings
from tests.service_fixtures import launch_ports
from worker.launcher import _Ingest, launch_command, rendezvous_port

SPEC = {"base_model": "Qwen/Qwen3-8B", "dataset_uri": "file-" + "a" * 26}


def test_a_cpu_worker_launches_torchrun_with_one_process_per_gpu() -> None:
    spec = parse_spec({**SPEC, "resources": {"gpus": 2}})
    command = launch_command(spec, processes=2, cuda=False, port=None, rank_args=["s.json"])
    assert command[1:4] == ["-m", "torch.distributed.run", "--nnodes=1"]
    assert "--nproc_per_node=2" in command and "--standalone" in command
    assert command[-3:] == ["-m", "worker.rank_entry", "s.json"]
    fixed = launch_command(spec, processes=2, cuda=False, port=16401, rank_args=[])
    assert "--master_port=16401" in fixed and "--standalone" not in fixed


def test_a_gpu_worker_launches_accelerate_with_the_specs_fsdp_options() -> None:
    from accelerate.commands.launch import launch_command_parser

    spec = parse_spec(
        {
            **SPEC,
            "resources": {"gpus": 8},
            "runtime": {
                "distributed": "fsdp",
                "fsdp_config": {
                    "fsdp_sharding_strategy": "HYBRID_SHARD",
                    "fsdp_offload_params": True,
                    "fsdp_transformer_layer_cls_to_wrap": "Qwen3DecoderLayer",
                },
            },
        }
    )
    command = launch_command(spec, processes=8, cuda=True, port=16402, rank_args=["s.json"])
    assert command[1:3] == ["-m", "accelerate.commands.launch"]
    args = launch_command_parser().parse_args(command[3:])  # accelerate's own reading
    assert args.multi_gpu and args.use_fsdp and args.num_processes == 8
    assert args.main_process_port == 16402 and args.module
    assert args.fsdp_sharding_strategy == "HYBRID_SHARD"
    assert args.fsdp_offload_params == "true"
    assert args.fsdp_transformer_layer_cls_to_wrap == "Qwen3DecoderLayer"
    assert args.training_script == "worker.rank_entry" and args.training_script_args == ["s.json"]
    ddp = launch_command(
        parse_spec({**SPEC, "resources": {"gpus": 2}}),
        processes=2,
        cuda=True,
        port=None,
        rank_args=[],
    )
    assert "--use_fsdp" not in ddp and not any(a.startswith("--fsdp") for a in ddp)


def test_the_rendezvous_port_is_a_free_one_of_the_range(tmp_path: Path) -> None:
    low = int(launch_ports().split("-")[0])  # this test process's share of the tests' range
    settings = ServiceSettings(home=tmp_path, launch_ports=f"{low}-{low + 1}")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", low))
        assert rendezvous_port(settings) == low + 1
    assert rendezvous_port(ServiceSettings(home=tmp_path)) is None
    with pytest.raises(ValueError):
        ServiceSettings(home=tmp_path, launch_ports="16410")


def _append(path: Path, row: dict[str, Any], *, newline: bool = True) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(row) + ("\n" if newline else ""))


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_ingest_sends_each_step_once_and_only_this_launchs_events(tmp_path: Path) -> None:
    """Rank 0's files are replayed into a receiver of the engine's callback protocol (here the
    engine's own JSONL recorder into another folder, as the worker's `StoreCallbacks` would)."""
    from opsd_engine.local_run import JsonlRecorder

    run, copy = tmp_path / "run", tmp_path / "copy"
    run.mkdir()
    copy.mkdir()
    metrics, events = run / "metrics.jsonl", run / "events.jsonl"
    _append(events, {"kind": "started", "message": "an earlier launch", "data": {}})
    _append(metrics, {"step": 1, "loss": 1.0})
    ingest = _Ingest(run, JsonlRecorder(copy))
    (run / "checkpoints" / "step-000001").mkdir(parents=True)
    _append(events, {"kind": "resumed", "message": "m", "data": {}})
    ckpt = {"step": 1, "path": str(run / "checkpoints" / "step-000001")}
    _append(events, {"kind": "checkpoint", "message": "m", "data": ckpt})
    gone = {"step": 9, "path": str(run / "checkpoints" / "step-000009")}
    _append(events, {"kind": "checkpoint", "message": "m", "data": gone})  # removed already
    _append(metrics, {"step": 2, "loss": 0.5}, newline=False)  # being written
    ingest()
    assert _rows(copy / "metrics.jsonl") == [{"step": 1, "loss": 1.0}]
    got = _rows(copy / "events.jsonl")
    assert [(e["kind"], e["data"].get("step")) for e in got] == [
        ("resumed", None),
        ("checkpoint", 1),
    ]
    # a resume rewrites metrics.jsonl (truncated to its checkpoint): read again, once per step
    replaced = run / "metrics.tmp"
    replaced.write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    replaced.rename(metrics)
    _append(metrics, {"step": 2, "loss": 0.5})
    ingest()
    assert _rows(copy / "metrics.jsonl") == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]


def test_a_launcher_ends_when_the_worker_that_started_it_is_killed(tmp_path: Path) -> None:
    """The worker starts its launcher through `worker.die_with_parent`: SIGKILL the worker and
    the launcher gets SIGTERM (here: a sleeping stand-in for torchrun writes its pid first)."""
    import signal
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "launcher.pid"
    launcher = tmp_path / "launcher.py"
    launcher.write_text(
        f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(60)\n"
    )
    worker = tmp_path / "celery_worker_stand_in.py"
    worker.write_text(
        "import os, subprocess, sys, time\n"
        "shim = [sys.executable, '-m', 'worker.die_with_parent', str(os.getpid())]\n"
        f"subprocess.Popen([*shim, sys.executable, {str(launcher)!r}], start_new_session=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, str(worker)], cwd=Path(__file__).parents[2])
    try:
        deadline = time.monotonic() + 30
        while not (pid_file.exists() and pid_file.read_text()):
            assert time.monotonic() < deadline and parent.poll() is None
            time.sleep(0.05)
        child = int(pid_file.read_text())
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
    deadline = time.monotonic() + 10
    while _alive(child):
        assert time.monotonic() < deadline, "the launcher outlived its worker"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    """Running (a zombie has ended: its parent died before it could wait for it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_a_rank_refused_by_the_tenants_guard_reports_a_user_error(
    tmp_path: Path, tiny_model_dir: Path, tiny_dataset: Path
) -> None:
    """A rank (`worker.rank_entry`, run alone: rank 0 of 1) opens its datasets under the tenant's
    guard that the worker wrote; a dataset the policy does not allow is a user error in the
    rank's error file, which the watching worker turns into the job's failure."""
    import subprocess
    import sys

    from jobstore.records import JobError
    from opsd_engine.config import spec_to_dict
    from tests.conftest import make_tiny_spec
    from worker.launcher import GroupFailed, _outcome, write_guard

    spec_file, guard, errors = tmp_path / "spec.json", tmp_path / "guard.json", tmp_path / "errors"
    spec_file.write_text(json.dumps(spec_to_dict(make_tiny_spec(tiny_model_dir, tiny_dataset))))
    settings = ServiceSettings(home=tmp_path, dataset_uri_policy="")  # uploaded files only
    write_guard(guard, settings, "acme", {})
    command = [sys.executable, "-m", "worker.rank_entry", str(spec_file), "--out"]
    command += [str(tmp_path / "run"), "--stop-file", str(tmp_path / "stop")]
    command += ["--error-dir", str(errors), "--guard", str(guard)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    report = json.loads((errors / "error-rank0.json").read_text())
    assert report["category"] == "user", report
    assert "not allowed" in report["message"], report
    (tmp_path / "stdout.log").write_text(done.stdout)
    with pytest.raises(GroupFailed) as failed:
        _outcome(1, tmp_path, errors, stopped=False)
    assert failed.value.error == JobError(report["code"], report["message"], "user")
