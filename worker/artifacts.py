"""Where a job's files live: its local run directory and the published copies of its
checkpoints and final adapter under the artifacts root.

The root is a local directory (the embedded shape and the compose volume) or any fsspec URI
(`s3://bucket/prefix`, `memory://x` in tests). Layout under the root, per job:

    jobs/<job_id>/checkpoints/step-000005/   (adapter/, optimizer.pt, trainer_state.json, ...)
    jobs/<job_id>/adapter/                   (the final LoRA adapter, PEFT format)

For a local root the run directory *is* `root/jobs/<job_id>`, so publishing is the identity and
the URIs are plain absolute paths. For a remote root the engine writes into a local scratch
directory and each complete checkpoint is uploaded; a job resumed on another machine fetches the
latest published checkpoint back into its scratch run directory first. An upload is recorded in
the store only after it finished, so a recorded URI always names a complete checkpoint.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import fsspec

CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def _local_path(uri: str) -> Path:
    return Path(uri.removeprefix("file://")).expanduser().absolute()


class ArtifactStore:
    """Run directories and published artifacts of jobs under one root URI."""

    def __init__(self, root_uri: str, *, scratch_dir: str | Path | None = None) -> None:
        self.local = _is_local(root_uri)
        if self.local:
            self.root = str(_local_path(root_uri))
            self.scratch = Path(self.root)
        else:
            self.root = root_uri.rstrip("/")
            self.scratch = Path(scratch_dir or Path(tempfile.gettempdir()) / "opsd-runs")
        self._fs: Any = None

    # ------------------------------------------------------------------------------ naming
    @property
    def fs(self) -> Any:
        if self._fs is None:
            self._fs, _ = fsspec.core.url_to_fs(self.root)
        return self._fs

    def job_uri(self, job_id: str) -> str:
        return f"{self.root}/jobs/{job_id}"

    def run_dir(self, job_id: str) -> Path:
        """The local directory the engine writes this job's run into (created)."""
        path = self.scratch / "jobs" / job_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    def adapter_uri(self, job_id: str) -> str:
        return f"{self.job_uri(job_id)}/{ADAPTER}"

    def checkpoint_uri(self, job_id: str, name: str) -> str:
        return f"{self.job_uri(job_id)}/{CHECKPOINTS}/{name}"

    # ---------------------------------------------------------------------------- publish
    def publish(self, job_id: str, local_dir: str | Path) -> str:
        """Make a complete directory of the run available under the root; return its URI."""
        local_dir = Path(local_dir).absolute()
        relative = local_dir.relative_to(self.run_dir(job_id).absolute())
        target = f"{self.job_uri(job_id)}/{relative.as_posix()}"
        if self.local:
            return target  # already in place
        if self.fs.exists(target):
            self.fs.rm(target, recursive=True)
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            self.fs.put_file(str(path), f"{target}/{path.relative_to(local_dir).as_posix()}")
        return target

    def publish_checkpoint(self, job_id: str, local_dir: str | Path) -> str:
        return self.publish(job_id, local_dir)

    def publish_adapter(self, job_id: str, local_dir: str | Path) -> str:
        return self.publish(job_id, local_dir)

    # ------------------------------------------------------------------------------ fetch
    def fetch_checkpoint(self, job_id: str, uri: str) -> Path:
        """Bring a published checkpoint into this job's local run directory; return its path.

        The copy is written beside its final place and renamed when complete, so the engine
        never sees a partial checkpoint. A checkpoint already present locally is kept.
        """
        name = uri.rstrip("/").rsplit("/", 1)[-1]
        final = self.run_dir(job_id) / CHECKPOINTS / name
        if final.exists():
            return final
        if self.local:
            source = _local_path(uri)
            if not source.is_dir():
                raise FileNotFoundError(f"checkpoint {uri} does not exist")
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.parent / f".fetch-{name}-{uuid.uuid4().hex[:8]}"
            shutil.copytree(source, tmp)
        else:
            fs, path = fsspec.core.url_to_fs(uri)
            files = [f for f in fs.find(path) if not fs.isdir(f)]
            if not files:
                raise FileNotFoundError(f"checkpoint {uri} does not exist")
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.parent / f".fetch-{name}-{uuid.uuid4().hex[:8]}"
            prefix = path.rstrip("/") + "/"
            for remote in files:
                local = tmp / remote.removeprefix(prefix)
                local.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(remote, str(local))
        os.rename(tmp, final)
        return final

    def published_checkpoints(self, job_id: str) -> list[str]:
        """URIs of the checkpoint directories under the root, oldest step first."""
        base = f"{self.job_uri(job_id)}/{CHECKPOINTS}"
        if self.local:
            folder = _local_path(base)
            names = [p.name for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []
        else:
            fs, path = fsspec.core.url_to_fs(base)
            names = (
                [entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False)]
                if fs.exists(path)
                else []
            )
        steps = sorted(n for n in names if n.startswith("step-") and n[5:].isdigit())
        return [f"{base}/{name}" for name in steps]

    def remove_published(self, job_id: str, uri: str) -> None:
        """Delete a published checkpoint under a remote root (under a local root the engine's
        own removal already took it: the run directory is where it is published)."""
        if self.local:
            return
        prefix = f"{self.job_uri(job_id)}/{CHECKPOINTS}/"
        if not uri.startswith(prefix):  # only this job's checkpoints, never another path
            raise ValueError(f"{uri} is not a checkpoint of job {job_id}")
        if self.fs.exists(uri):
            self.fs.rm(uri, recursive=True)

    def remove_run_dir(self, job_id: str) -> None:
        """Drop the local scratch copy of a remote-root job (never the published files)."""
        if not self.local:
            shutil.rmtree(self.scratch / "jobs" / job_id, ignore_errors=True)
