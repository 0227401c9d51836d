"""The inference server the contract suite runs against, and what it needs to know about it.

Without ``OPSD_TEST_INFERENCE_URL``: ``opsd serve-adapters`` is started as a subprocess (the
real command, on a free loopback port, ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``,
``--max-lora-rank 16`` as vLLM's default) serving the tiny model in the Qwen3 *-Base layout.

With ``OPSD_TEST_INFERENCE_URL`` (e.g. ``http://127.0.0.1:8000``): the same tests run, unchanged,
against that server, a real vLLM started with ``--enable-lora`` and
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``. The tests also need

* ``OPSD_TEST_INFERENCE_MODEL``: a local directory of the model it serves (its tokenizer and
  generation config give the expected stop set; required);
* ``OPSD_TEST_INFERENCE_ADAPTER_DIR``: a directory the server can read at the same path, where
  test adapters are written (default: a temporary directory, enough for a server on this host);
* ``OPSD_TEST_INFERENCE_MAX_LORA_RANK``: the server's ``--max-lora-rank`` (default 16, vLLM's).

Only loopback or the named server is contacted.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

URL_ENV = "OPSD_TEST_INFERENCE_URL"
MODEL_ENV = "OPSD_TEST_INFERENCE_MODEL"
ADAPTER_DIR_ENV = "OPSD_TEST_INFERENCE_ADAPTER_DIR"
MAX_RANK_ENV = "OPSD_TEST_INFERENCE_MAX_LORA_RANK"
STAND_IN_MAX_LORA_RANK = 16  # vLLM's default --max-lora-rank


@dataclass
class Served:
    """A running inference server and the facts about its model the expectations use."""

    url: str
    model_dir: Path
    adapter_dir: Path
    max_lora_rank: int
    real: bool  # a server named by OPSD_TEST_INFERENCE_URL (not our stand-in)
    base: str = ""
    tokenizer: Any = None
    eos_ids: set[int] = field(default_factory=set)  # tokenizer EOS + generation config EOS
    primary_eos: int | None = None  # the tokenizer's EOS (stop_reason None)
    end_of_turn: int | None = None  # the chat template's end-of-turn token
    http: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=600))

    def post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        return self.http.post(self.url + path, json=body)

    def complete(self, **body: Any) -> dict[str, Any]:
        """A ``/v1/completions`` call that must succeed; token ids always returned."""
        response = self.post(
            "/v1/completions", {"model": self.base, "return_token_ids": True, **body}
        )
        assert response.status_code == 200, response.text
        return response.json()

    def model_ids(self) -> list[str]:
        response = self.http.get(self.url + "/v1/models")
        assert response.status_code == 200, response.text
        return [str(card["id"]) for card in response.json()["data"]]


def _wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"opsd serve-adapters exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"opsd serve-adapters did not become healthy: {log.read_text()[-2000:]}")


@pytest.fixture(scope="session")
def served(
    qwen3_base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    from transformers import GenerationConfig

    from opsd_engine.modeling import load_generation_config, load_tokenizer
    from opsd_engine.prompts import end_of_turn_token_id
    from tests.evals.helpers import free_port

    process: subprocess.Popen[bytes] | None = None
    if os.environ.get(URL_ENV):
        if not os.environ.get(MODEL_ENV):
            pytest.fail(f"{URL_ENV} is set: set {MODEL_ENV} to a local copy of the served model")
        adapter_dir = Path(
            os.environ.get(ADAPTER_DIR_ENV) or tempfile.mkdtemp(prefix="opsd-contract-")
        )
        server = Served(
            url=os.environ[URL_ENV].rstrip("/").removesuffix("/v1"),
            model_dir=Path(os.environ[MODEL_ENV]),
            adapter_dir=adapter_dir,
            max_lora_rank=int(os.environ.get(MAX_RANK_ENV, "16")),
            real=True,
        )
    else:
        port = free_port()
        log = tmp_path_factory.mktemp("serve-adapters") / "server.log"
        env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
        command = [
            sys.executable,
            "-m",
            "opsd_cli",
            "serve-adapters",
            "--base-model",
            str(qwen3_base_model_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--max-lora-rank",
            str(STAND_IN_MAX_LORA_RANK),
            "--device",
            "cpu",
            "--dtype",
            "float32",
        ]
        with log.open("wb") as sink:
            process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
        server = Served(
            url=f"http://127.0.0.1:{port}",
            model_dir=qwen3_base_model_dir,
            adapter_dir=tmp_path_factory.mktemp("contract-adapters"),
            max_lora_rank=STAND_IN_MAX_LORA_RANK,
            real=False,
        )
        _wait_healthy(server.url, process, log)
    try:
        bases = [c for c in server.http.get(server.url + "/v1/models").json()["data"]]
        server.base = str(next(c["id"] for c in bases if not c.get("parent")))
        server.tokenizer = load_tokenizer(str(server.model_dir))
        generation: GenerationConfig = load_generation_config(str(server.model_dir))
        eos = generation.eos_token_id
        server.primary_eos = server.tokenizer.eos_token_id
        server.eos_ids = {
            int(t)
            for t in [server.primary_eos, *(eos if isinstance(eos, list) else [eos])]
            if t is not None
        }
        server.end_of_turn = end_of_turn_token_id(server.tokenizer)
        yield server
    finally:
        server.http.close()
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
