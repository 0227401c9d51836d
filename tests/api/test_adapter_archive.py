"""The adapter archive (`GET /jobs/{id}/adapter`) keeps each file's time, so unpacked files are
not dated 1970 (tar's default mtime 0), with `tar xzf`, Python's tarfile and the SDK alike."""

from __future__ import annotations

import os
import tarfile
import time
from pathlib import Path

from api.routes.jobs import _tar_directory
from opsd_client._files import extract_adapter


def test_archive_members_carry_the_files_times_and_unpack_with_them(tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    written = time.time() - 3600  # an hour ago: neither 0 nor "now"
    for path in adapter.iterdir():
        os.utime(path, (written, written))

    archive = tmp_path / "adapter.tar.gz"
    archive.write_bytes(_tar_directory(str(adapter)).read())
    with tarfile.open(archive) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert set(members) == {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"}
        for member in members.values():
            assert member.mtime == int(written)
            assert member.mode == 0o644
        tar.extractall(tmp_path / "tar", filter="data")
    for path in (tmp_path / "tar" / "adapter").iterdir():
        assert int(path.stat().st_mtime) == int(written), path

    extract_adapter(archive, tmp_path / "sdk")
    for path in (tmp_path / "sdk").iterdir():
        assert int(path.stat().st_mtime) == int(written), path
