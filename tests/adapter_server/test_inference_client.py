"""The worker's inference client against a real adapter server over HTTP (uvicorn, local port)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from adapter_server.app import create_app
from adapter_server.engine import AdapterEngine
from tests.evals.helpers import free_port, serve_in_thread, trained_adapter
from worker.inference_client import InferenceClient, InferenceError


@pytest.fixture(scope="module")
def server_url(tiny_model_dir: Path) -> Iterator[str]:
    engine = AdapterEngine(str(tiny_model_dir), device="cpu", dtype="float32")
    with serve_in_thread(create_app(engine, allow_runtime_lora=True)) as url:
        yield url


@pytest.fixture(scope="module")
def adapter_dir(
    tiny_model_dir: Path, tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    return trained_adapter(tiny_model_dir, tiny_dataset, tmp_path_factory.mktemp("adapter"))


def test_adapter_lifecycle_and_generation(
    server_url: str, adapter_dir: Path, tiny_model_dir: Path
) -> None:
    with InferenceClient(server_url + "/v1/", admin_timeout=30) as client:
        assert client.base_url == server_url
        assert client.base_model() == "model"
        assert client.base_model(expected=str(tiny_model_dir)) == "model"
        assert client.base_model(expected="someone/model") == "model"  # same last component
        with pytest.raises(InferenceError, match="not the job's base model"):
            client.base_model(expected="Qwen/Qwen3-1.7B")

        assert client.ensure_adapter("job_x-step3", str(adapter_dir)) is True
        assert client.ensure_adapter("job_x-step3", str(adapter_dir)) is False
        assert {"model", "job_x-step3"} == client.model_ids()
        with pytest.raises(InferenceError) as duplicate:
            client.load_adapter("job_x-step3", str(adapter_dir))
        assert duplicate.value.status == 400 and "already been loaded" in str(duplicate.value)
        with pytest.raises(InferenceError) as missing:
            client.load_adapter("other", "/no/such/adapter")
        assert missing.value.status == 404

        texts = client.completions(
            model="job_x-step3",
            prompts=[[1, 2, 3], [4, 5], [6]],
            n=2,
            max_tokens=4,
            temperature=1.0,
            top_p=0.95,
            top_k=0,
            seed=5,
            stop_token_ids=[509],
        )
        assert [len(row) for row in texts] == [2, 2, 2]
        assert all(0 < c.num_tokens <= 4 and c.finish_reason for row in texts for c in row)
        replies = client.chat_completions(
            model="model",
            messages=[{"role": "user", "content": "hi"}],
            n=3,
            max_tokens=3,
            temperature=0.6,
            top_p=0.95,
            chat_template_kwargs={"enable_thinking": False},
            stop_token_ids=[509],
        )
        assert len(replies) == 3 and all(isinstance(r, str) for r in replies)
        client.unload_adapter("job_x-step3")
        assert client.model_ids() == {"model"}
        with pytest.raises(InferenceError) as gone:
            client.completions(
                model="job_x-step3",
                prompts=[[1]],
                n=1,
                max_tokens=1,
                temperature=0,
                top_p=1,
                stop_token_ids=[509],
            )
        assert gone.value.status == 404


def test_unreachable_server_is_a_clear_error() -> None:
    client = InferenceClient(f"http://127.0.0.1:{free_port()}", admin_timeout=2)
    with pytest.raises(InferenceError, match="cannot reach the inference server"):
        client.models()
    client.close()


def test_a_connection_closed_under_a_request_is_retried_once() -> None:
    """A server may close a keep-alive connection as a request arrives on it (uvicorn, and so
    vLLM, close idle ones after 5 s): the client resends once on a fresh connection."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    seen: list[int] = []

    def serve() -> None:
        for attempt in range(2):
            connection, _ = listener.accept()
            with connection:
                connection.recv(65536)
                seen.append(attempt)
                if attempt == 0:
                    continue  # closed without a response: "Server disconnected"
                body = b'{"object": "list", "data": [{"id": "m", "parent": null}]}'
                connection.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                    + str(len(body)).encode()
                    + b"\r\nConnection: close\r\n\r\n"
                    + body
                )

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with InferenceClient(f"http://127.0.0.1:{port}", admin_timeout=10) as client:
        assert client.model_ids() == {"m"}
    thread.join(timeout=10)
    listener.close()
    assert seen == [0, 1]
