"""Quick start: the whole service on this machine, one OPSD job end to end through HTTP.

1. builds the offline tiny Qwen3-architecture model and a toy problem/solution dataset;
2. starts the embedded service (`opsd up`: SQLite state, file-backed broker, local artifacts,
   API + worker processes) in a temporary home;
3. submits a job with `POST /jobs`, follows `GET /jobs/{id}` with a progress bar, reads
   `GET /jobs/{id}/metrics`, `/events`, `/checkpoints`, downloads `/adapter` and loads it with
   peft; writes the metric curves to `runs/quickstart/metrics.png`;
4. stops the service.

    python examples/quickstart_service.py [--steps 30] [--keep-running]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "runs" / "quickstart"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _opsd(*args: str) -> list[str]:
    return [sys.executable, "-m", "opsd_cli", *args]


def _start_service(home: Path, port: int) -> tuple[subprocess.Popen, str]:
    log = open(OUT / "service.log", "w")  # noqa: SIM115 - lives as long as the service
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    process = subprocess.Popen(
        _opsd("up", "--home", str(home), "--host", "127.0.0.1", "--port", str(port)),
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    key = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"opsd up exited:\n{(OUT / 'service.log').read_text()}")
        text = (OUT / "service.log").read_text()
        match = re.search(r"\bopsd_[A-Za-z0-9]+_[A-Za-z0-9_\-]+", text)
        if key is None and match:
            key = match.group(0)
        if key is None and (home / "api_key").exists():
            key = (home / "api_key").read_text().strip()
        try:
            if key and httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return process, key
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit("the service did not become ready in time; see runs/quickstart/service.log")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument(
        "--keep-running", action="store_true", help="leave the service up at the end"
    )
    args = parser.parse_args()

    from opsd_engine.report import format_table, plot_metrics, summarize
    from opsd_engine.tiny import build_tiny_model, write_tiny_dataset

    OUT.mkdir(parents=True, exist_ok=True)
    model_dir = build_tiny_model(OUT / "model", seed=0)
    dataset = write_tiny_dataset(OUT / "train.jsonl", n=64, seed=0)
    home = OUT / "home"
    port = _free_port()
    print(f"starting the embedded service (opsd up --home {home}) ...", flush=True)
    service, key = _start_service(home, port)
    base_url = f"http://127.0.0.1:{port}"
    print(f"service ready at {base_url} (dashboard: {base_url}/ui)", flush=True)
    try:
        http = httpx.Client(
            base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        )
        body = {
            "base_model": str(model_dir),
            "dataset_uri": str(dataset),
            "max_new_tokens": 16,
            "checkpoint_every": 10,
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "optim": {
                "learning_rate": 0.01,
                "batch_size": 4,
                "grad_accum": 2,
                "max_steps": args.steps,
            },
            "runtime": {"dtype": "float32", "device": "cpu", "gradient_checkpointing": False},
            "metadata": {"example": "quickstart"},
        }
        response = http.post("/jobs", json=body, headers={"Idempotency-Key": f"quickstart-{port}"})
        response.raise_for_status()
        job = response.json()
        print(f"POST /jobs -> {job['id']} ({job['status']})", flush=True)

        from tqdm import tqdm

        with tqdm(total=args.steps, desc="training", unit="step") as bar:
            while job["status"] not in ("succeeded", "failed", "cancelled"):
                time.sleep(0.5)
                job = http.get(f"/jobs/{job['id']}").json()
                bar.update(job["progress"]["step"] - bar.n)
        if job["status"] != "succeeded":
            raise SystemExit(f"job {job['status']}: {json.dumps(job['error'])}")

        series = http.get(f"/jobs/{job['id']}/metrics").json()["metrics"]
        steps = series["loss"]["steps"]
        rows = [
            {
                "step": step,
                **{name: s["values"][i] for name, s in series.items() if i < len(s["values"])},
            }
            for i, step in enumerate(steps)
        ]
        print(format_table(summarize(rows)))
        kinds = [e["kind"] for e in http.get(f"/jobs/{job['id']}/events").json()["data"]]
        checkpoints = [c["step"] for c in http.get(f"/jobs/{job['id']}/checkpoints").json()["data"]]
        print(f"events: {' -> '.join(kinds)}\ncheckpoints at steps {checkpoints}")

        archive = http.get(f"/jobs/{job['id']}/adapter")
        archive.raise_for_status()
        with tarfile.open(fileobj=io.BytesIO(archive.content), mode="r:gz") as tar:
            tar.extractall(OUT / "download", filter="data")
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(str(model_dir)), str(OUT / "download" / "adapter")
        )
        print(f"adapter downloaded to {OUT / 'download' / 'adapter'} and loaded with peft")
        print(f"plot: {plot_metrics(rows, OUT / 'metrics.png', title=job['id'])}")
        if args.keep_running:
            print(f"service still running at {base_url}; key: {key}; Ctrl-C to stop")
            service.wait()
    finally:
        if service.poll() is None:
            service.send_signal(signal.SIGTERM)
            service.wait(timeout=60)


if __name__ == "__main__":
    main()
