"""Local files for the SDK: where a downloaded adapter goes, and a safe tar.gz extraction.

The service sends an adapter as a gzipped tar whose entries sit under `adapter/`. Extraction keeps
regular files and folders only, strips that top folder, and refuses absolute paths, `..` and
links, so an archive can never write outside the destination.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path, PurePosixPath

ARCHIVE_ROOT = "adapter"


class UnsafeArchiveError(ValueError):
    """The archive holds an entry that would land outside the destination (or is a link)."""


def archive_path(path: Path, job_id: str) -> Path:
    """Where to write the archive: `path` itself, or `<path>/<job>-adapter.tar.gz` for a dir."""
    if path.is_dir():
        return path / f"{job_id}-adapter.tar.gz"
    return path


def extract_adapter(archive: Path, dest: Path) -> Path:
    """Unpack the adapter archive into `dest` (created; must be empty if it exists)."""
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"{dest} is not empty; choose a new folder for the adapter")
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    with tarfile.open(archive, mode="r:gz") as tar:
        for member in tar:
            parts = PurePosixPath(member.name).parts
            if parts and parts[0] == ARCHIVE_ROOT:
                parts = parts[1:]
            if not parts:
                continue
            if PurePosixPath(member.name).is_absolute() or ".." in parts:
                raise UnsafeArchiveError(f"refusing archive entry {member.name!r}")
            target = root.joinpath(*parts)
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            if not member.isfile():
                raise UnsafeArchiveError(f"refusing non-file archive entry {member.name!r}")
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            if source is None:  # pragma: no cover - isfile() entries always have data
                continue
            with source, open(target, "wb") as out:
                shutil.copyfileobj(source, out)
            if member.mtime > 0:  # the file's time on the server (archives of old servers: 0)
                os.utime(target, (member.mtime, member.mtime))
    return dest
