"""Helpers shared by the eval and adapter-server tests: a benchmark file, a trained tiny adapter
(trained once per session), and a real adapter server on a local port in a thread."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_ADAPTERS: dict[tuple[str, str], Path] = {}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_benchmark(path: Path, *, n: int = 3, seed: int = 7, solution_only: int = 0) -> Path:
    """``n`` tiny arithmetic problems with ``problem``/``answer``; the last ``solution_only`` rows
    carry only a solution ending in ``\\boxed{N}`` (the answer comes from there)."""
    from opsd_engine.tiny import tiny_examples

    rows = []
    for index, row in enumerate(tiny_examples(n, seed=seed)):
        if index >= n - solution_only:
            rows.append({"problem": row["problem"], "solution": row["solution"]})
        else:
            rows.append({"problem": row["problem"], "answer": row["answer"]})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def trained_adapter(model_dir: Path, dataset: Path, root: Path) -> Path:
    """A LoRA adapter trained for 3 OPSD steps on the tiny model (once per test session)."""
    key = (str(model_dir), str(dataset))
    if key not in _ADAPTERS:
        from opsd_engine.trainers.opsd import train
        from tests.conftest import make_tiny_spec

        result = train(make_tiny_spec(model_dir, dataset), root / "trained-run")
        assert result.status == "succeeded" and result.adapter_dir is not None
        _ADAPTERS[key] = result.adapter_dir
    return _ADAPTERS[key]


@contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """Run an ASGI app with uvicorn on a free local port; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
