"""Every README command works as pasted: its code blocks are extracted and run.

A block runs as one `bash` script (`python` blocks with the interpreter), in a fresh copy of the
repository's tracked files with `HOME` in a temporary folder (`~/.opsd` is the test's own), the
project's virtualenv first on `PATH`, offline. It must exit 0 and print no API error document.

Markers (an HTML comment on the line before a block, invisible on GitHub):

* `<!-- readme-test: skip (why) -->`: not run (GPU-only commands, a real model...);
* `<!-- readme-test: bounded NAME -->`: run through :data:`BOUNDED` [NAME], a shorter form of the
  same commands (a free port instead of 8000, a quick run instead of a 10-minute one).

Blocks without a marker run as they are, so a block someone adds is tested by default; one that
cannot run here must say so with a marker. Also checked: every relative link points at a file of
the repository, and the checkpoint names the README quotes are the ones the engine writes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MARKER = re.compile(r"<!--\s*readme-test:\s*(skip|bounded)\b\s*(.*?)\s*-->")
FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    language: str
    text: str
    marker: str | None  # "skip" | "bounded" | None
    argument: str

    @property
    def id(self) -> str:
        return f"line{self.line}-{self.language or 'text'}"


def readme_blocks() -> list[Block]:
    lines = README.read_text(encoding="utf-8").splitlines()
    blocks, index = [], 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        end = index + 1
        while end < len(lines) and not lines[end].startswith("```"):
            end += 1
        previous = lines[index - 1] if index else ""
        marker = MARKER.search(previous)
        blocks.append(
            Block(
                line=index + 1,
                language=opening.group(1),
                text="\n".join(lines[index + 1 : end]) + "\n",
                marker=marker.group(1) if marker else None,
                argument=marker.group(2) if marker else "",
            )
        )
        index = end + 1
    return blocks


RUNNABLE = [b for b in readme_blocks() if b.language in ("bash", "sh", "python")]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _environment(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPSD_", "PYTEST_"))}
    env.update(
        HOME=str(home),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        OPSD_VENV=str(Path(sys.executable).parents[1]),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    if "OPSD_TEST_REDIS_SERVER" in os.environ:  # the suite's own Redis, for nested test runs
        env["OPSD_TEST_REDIS_SERVER"] = os.environ["OPSD_TEST_REDIS_SERVER"]
    return env


def _copy_of_repo(target: Path) -> Path:
    """The tracked files (and those not ignored) of this checkout: what a fresh clone has."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def _run(script: str, *, cwd: Path, env: dict[str, str], timeout: float, language: str = "bash"):
    command = (
        [sys.executable, "-c", script]
        if language == "python"
        else ["bash", "-euo", "pipefail", "-c", script]
    )
    return subprocess.run(
        command,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _api_errors(output: str) -> list[str]:
    """Lines (or JSON documents inside them) that are the API's error shape."""
    found = []
    for line in output.splitlines():
        for candidate in re.findall(r"\{.*\}", line):
            try:
                document = json.loads(candidate)
            except ValueError:
                continue
            if isinstance(document, dict) and isinstance(document.get("error"), dict):
                found.append(line)
    return found


# ------------------------------------------------------------------------------ bounded forms
def _bounded_service(block: Block, cwd: Path, env: dict[str, str]) -> str:
    """`opsd up` on a free port instead of 8000 (which may be taken here), stopped at the end."""
    port = str(_free_port())
    script = block.text.replace(":8000", f":{port}").replace("--port 8000", f"--port {port}")
    return script + "\nkill %1\nwait %1 || true\n"


def _bounded_quickstart(block: Block, cwd: Path, env: dict[str, str]) -> str:
    """The quick start's two commands in their bounded form, in this checkout (they set up the
    virtualenv it already has): the service path with a small base model, and the test command
    on the dashboard's sign-in test (Chromium included)."""
    assert "bash scripts/quickstart.sh" in block.text and "bash scripts/test.sh" in block.text
    return (
        "bash scripts/quickstart.sh --quick\n"
        "bash scripts/test.sh tests/ui/test_dashboard.py -q -p no:cacheprovider "
        "-k test_sign_in_rejects_a_bad_key_and_accepts_a_good_one\n"
    )


BOUNDED: dict[str, Callable[[Block, Path, dict[str, str]], str]] = {
    "service": _bounded_service,
    "quickstart": _bounded_quickstart,
}
IN_CHECKOUT = {"quickstart"}  # these run in this checkout, not a copy (they reuse its .venv)


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: b.id)
def test_readme_block_runs_as_pasted(block: Block, tmp_path: Path) -> None:
    if block.marker == "skip":
        pytest.skip(f"README line {block.line}: {block.argument or 'marked skip'}")
    home = tmp_path / "home"
    home.mkdir()
    env = _environment(home)
    if block.marker == "bounded":
        assert block.argument in BOUNDED, (
            f"README line {block.line}: no bounded form {block.argument!r}"
        )
        cwd = REPO if block.argument in IN_CHECKOUT else _copy_of_repo(tmp_path / "repo")
        script = BOUNDED[block.argument](block, cwd, env)
    else:
        cwd, script = _copy_of_repo(tmp_path / "repo"), block.text
    result = _run(script, cwd=cwd, env=env, timeout=1500, language=block.language)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"README line {block.line} failed:\n{output[-6000:]}"
    assert not _api_errors(result.stdout), f"README line {block.line}: {_api_errors(output)}"


def test_every_readme_block_is_known_to_this_test() -> None:
    """Markers name a bounded form this test defines; shell blocks are bash/sh/python only."""
    for block in readme_blocks():
        if block.marker == "bounded":
            assert block.argument in BOUNDED, f"line {block.line}: unknown {block.argument!r}"


def test_relative_links_point_at_files_of_the_repository() -> None:
    text = README.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if "://" not in t and not t.startswith("mailto:")]
    assert local, "the README links no file at all?"
    tracked = set(
        subprocess.run(
            ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.split()
    )
    for target in local:
        path = (REPO / target).resolve()
        assert path.is_relative_to(REPO), f"{target} is outside the repository"
        relative = path.relative_to(REPO).as_posix()
        assert relative in tracked or any(t.startswith(relative + "/") for t in tracked), target


def test_checkpoint_names_in_the_readme_are_the_engines() -> None:
    from opsd_engine.checkpoint import step_dir_name

    text = README.read_text(encoding="utf-8")
    quoted = set(re.findall(r"step-\d+", text))
    assert quoted, "the README names no checkpoint directory"
    for name in quoted:
        assert name == step_dir_name(int(name.removeprefix("step-"))), name
