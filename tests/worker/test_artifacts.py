"""ArtifactStore on a local root (publishing is the identity) and on fsspec `memory://`."""

from __future__ import annotations

import uuid
from pathlib import Path

import fsspec
import pytest

from worker.artifacts import ArtifactStore


def _fake_checkpoint(run_dir: Path, step: int) -> Path:
    path = run_dir / "checkpoints" / f"step-{step:06d}"
    (path / "adapter").mkdir(parents=True)
    (path / "adapter" / "adapter_config.json").write_text('{"r": 4}')
    (path / "adapter" / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 4)
    (path / "trainer_state.json").write_text(f'{{"step": {step}}}')
    return path


def test_local_root_runs_in_place(tmp_path: Path) -> None:
    artifacts = ArtifactStore(str(tmp_path / "artifacts"))
    run_dir = artifacts.run_dir("job_1")
    assert run_dir == tmp_path / "artifacts" / "jobs" / "job_1" and run_dir.is_dir()

    checkpoint = _fake_checkpoint(run_dir, 5)
    uri = artifacts.publish_checkpoint("job_1", checkpoint)
    assert Path(uri) == checkpoint
    assert artifacts.published_checkpoints("job_1") == [uri]
    assert artifacts.fetch_checkpoint("job_1", uri) == checkpoint
    assert artifacts.adapter_uri("job_1") == str(run_dir / "adapter")


def test_file_uri_root_is_local(tmp_path: Path) -> None:
    artifacts = ArtifactStore(f"file://{tmp_path}/a")
    assert artifacts.local and artifacts.run_dir("j") == tmp_path / "a" / "jobs" / "j"


def test_memory_root_publishes_and_fetches_for_another_machine(tmp_path: Path) -> None:
    root = f"memory://opsd-tests/{uuid.uuid4().hex}"
    machine_a = ArtifactStore(root, scratch_dir=tmp_path / "a")
    run_dir = machine_a.run_dir("job_1")
    assert run_dir == tmp_path / "a" / "jobs" / "job_1"
    uris = [machine_a.publish_checkpoint("job_1", _fake_checkpoint(run_dir, s)) for s in (2, 10)]
    assert uris == [
        f"{root}/jobs/job_1/checkpoints/step-000002",
        f"{root}/jobs/job_1/checkpoints/step-000010",
    ]
    fs, path = fsspec.core.url_to_fs(uris[1])
    assert fs.exists(f"{path}/adapter/adapter_model.safetensors")

    machine_b = ArtifactStore(root, scratch_dir=tmp_path / "b")
    assert machine_b.published_checkpoints("job_1") == uris
    local = machine_b.fetch_checkpoint("job_1", uris[-1])
    assert local == tmp_path / "b" / "jobs" / "job_1" / "checkpoints" / "step-000010"
    original = run_dir / "checkpoints" / "step-000010"
    for file in original.rglob("*"):
        if file.is_file():
            assert (local / file.relative_to(original)).read_bytes() == file.read_bytes()
    assert not [p for p in local.parent.iterdir() if p.name.startswith(".")]

    # Republishing replaces the remote copy; the adapter gets its own URI.
    adapter = run_dir / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    assert machine_a.publish_adapter("job_1", adapter) == machine_a.adapter_uri("job_1")
    assert fs.exists(
        fsspec.core.url_to_fs(machine_a.adapter_uri("job_1"))[1] + "/adapter_config.json"
    )
    machine_b.remove_run_dir("job_1")
    assert not (tmp_path / "b" / "jobs" / "job_1").exists()


def test_fetch_of_a_missing_checkpoint_fails(tmp_path: Path) -> None:
    artifacts = ArtifactStore(f"memory://opsd-tests/{uuid.uuid4().hex}", scratch_dir=tmp_path)
    with pytest.raises(FileNotFoundError):
        artifacts.fetch_checkpoint("job_1", f"{artifacts.root}/jobs/job_1/checkpoints/step-000001")
