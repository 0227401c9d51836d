"""Quick start: the whole service on this machine, and OPSD making a model better.

1. builds (or reuses, from `benchmarks/toy_reasoning/.cache`) the toy reasoning base: a small
   Qwen3-architecture model pretrained here on multi-step arithmetic (about 5 minutes the first
   time) that solves held-out problems far more often with the reference solution in its
   context than without it; writes the task's training and held-out problems;
2. starts the embedded service (`opsd up`: SQLite state, file-backed broker, local artifacts,
   API + worker processes) in a temporary home;
3. submits one OPSD job with `POST /jobs` (the toy replication's spec, with a `preflight` group
   that measures the privileged gap and checks that student and teacher are aligned before the
   first step, and an `eval` group that evaluates the base and then the student on the held-out
   problems every 10 steps), follows
   `GET /jobs/{id}` with a progress bar, reads `GET /jobs/{id}/metrics`, `/events`,
   `/checkpoints`, downloads `/adapter` and loads it with peft; prints held-out accuracy before
   and after and writes the curves to `runs/quickstart/metrics.png`;
4. stops the service. Exits 1 if training did not raise held-out accuracy.

    python examples/quickstart_service.py [--steps 30] [--keep-running] [--quick]
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
    if os.environ.get("OPSD_QUICKSTART_PORT"):  # a fixed port (e.g. on a shared machine)
        return int(os.environ["OPSD_QUICKSTART_PORT"])
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


def _activity(evaluating: dict | None) -> str:
    """`eval of the base: 40/128 problems, 12.3 samples/s` while the job evaluates, else ''."""
    if not evaluating:
        return ""
    who = "the base" if evaluating["role"] == "base" else f"step {evaluating.get('step')}"
    return (
        f"eval of {who}: {evaluating['done']}/{evaluating['total']} problems, "
        f"{evaluating['samples_per_s']:.1f} samples/s"
    )


EVAL_EVERY = 10
PREFLIGHT, PREFLIGHT_QUICK = 64, 8  # problems the pre-flight samples


def _toy_task(quick: bool = False) -> tuple[Path, Path, dict]:
    """The toy base (cached) and its task files; returns (base, held-out file, job body).

    `quick`: a base pretrained for 60 steps and 16 held-out problems at 2 samples, the same path
    through the service in about a minute (what the README test runs; no accuracy claim)."""
    import torch

    sys.path.insert(0, str(REPO))
    from benchmarks.toy_reasoning.base import BaseConfig, build_base
    from benchmarks.toy_reasoning.run import DEFAULT_CACHE, Plan, make_spec
    from benchmarks.toy_reasoning.task import make_splits, write_jsonl
    from opsd_engine.config import spec_to_dict

    torch.set_num_threads(1)  # what the toy's timings assume; faster than 2 on busy cores
    print(
        f"toy reasoning base model (cache: {DEFAULT_CACHE}; pretrained once, ~5 min on 2 cores)",
        flush=True,
    )
    config = BaseConfig(steps=60) if quick else BaseConfig()
    base_dir, cached = build_base(DEFAULT_CACHE, config, progress=print)
    print(f"base model: {base_dir} ({'cached' if cached else 'pretrained now'})", flush=True)
    plan = Plan(n_heldout=16, eval_n=2) if quick else Plan()
    train, _, heldout = make_splits(
        seed=0, n_train=plan.n_train, n_validation=plan.n_validation, n_heldout=plan.n_heldout
    )
    train_path = write_jsonl(train, OUT / "data" / "train.jsonl")
    heldout_path = write_jsonl(heldout, OUT / "data" / "heldout.jsonl")
    body = spec_to_dict(make_spec(plan, "opsd", 0, base_dir, train_path))
    body["eval"] = {
        "dataset_uri": str(heldout_path),
        "n": plan.eval_n,
        "max_new_tokens": plan.max_new_tokens,
        "temperature": plan.eval_temperature,
        "top_p": plan.eval_top_p,
        "every_steps": 2 if quick else EVAL_EVERY,
        "include_base": True,
    }
    # the pre-flight before the first step: student without vs teacher with the reference on
    # the head of the first epoch, and the alignment checks (`opsd_engine.preflight`)
    body["preflight"] = {"run_first": True, "sample_size": PREFLIGHT_QUICK if quick else PREFLIGHT}
    return base_dir, heldout_path, body


def _preflight_line(rows: list[dict]) -> str:
    """The pre-flight's numbers as the job recorded them (`preflight/*` metrics at step 0)."""
    found = next((r for r in rows if r["step"] == 0 and "preflight/status" in r), None)
    if found is None:
        raise SystemExit("the job recorded no pre-flight")
    status = ("pass", "warn", "fail")[int(found["preflight/status"])]
    checks = {
        name.removeprefix("preflight/check/"): ("pass", "warn", "fail")[int(value)]
        for name, value in found.items()
        if name.startswith("preflight/check/")
    }
    student, teacher = found["preflight/student_accuracy"], found["preflight/teacher_accuracy"]
    return (
        f"pre-flight: student without the reference {100 * student:.1f}%, "
        f"teacher with it {100 * teacher:.1f}% "
        f"(privileged gap {100 * found['preflight/gap']:+.1f} points); {status} "
        f"({', '.join(f'{name} {verdict}' for name, verdict in checks.items())})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument(
        "--keep-running", action="store_true", help="leave the service up at the end"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a small base and eval, 4 steps: the same path in about a minute, no accuracy claim",
    )
    args = parser.parse_args()
    if args.quick:
        args.steps = min(args.steps, 4)

    from opsd_engine.report import DEFAULT_PLOTS, format_table, plot_metrics, summarize

    OUT.mkdir(parents=True, exist_ok=True)
    base_dir, heldout_path, body = _toy_task(args.quick)
    body["optim"]["max_steps"] = args.steps
    body["checkpoint_every"] = body["eval"]["every_steps"]
    body["metadata"] = {"example": "quickstart", "task": "toy_reasoning"}
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
        response = http.post("/jobs", json=body, headers={"Idempotency-Key": f"quickstart-{port}"})
        response.raise_for_status()
        job = response.json()
        print(f"POST /jobs -> {job['id']} ({job['status']})", flush=True)

        from tqdm import tqdm

        with tqdm(total=args.steps, desc="OPSD training", unit="step") as bar:
            shown = ""
            while job["status"] not in ("succeeded", "failed", "cancelled"):
                time.sleep(0.5)
                job = http.get(f"/jobs/{job['id']}").json()
                # while the spec's eval group runs, the bar says what is evaluated and how far
                doing = _activity(job["progress"].get("eval"))
                if not doing and job["status"] == "running" and job["progress"]["step"] == 0:
                    doing = "pre-flight / first step"
                if doing != shown:
                    bar.set_postfix_str(doing, refresh=False)
                    bar.refresh()
                    shown = doing
                if (advanced := job["progress"]["step"] - bar.n) > 0:
                    bar.update(advanced)  # (no redraw while waiting: logs get one line per step)
        if job["status"] != "succeeded":
            raise SystemExit(f"job {job['status']}: {json.dumps(job['error'])}")

        from opsd_client.models import Metrics

        metrics = Metrics.model_validate(http.get(f"/jobs/{job['id']}/metrics").json())
        rows = [{"step": step, **values} for step, values in metrics.rows()]
        print(_preflight_line(rows), flush=True)
        print(format_table(summarize([r for r in rows if "loss" in r])))
        kinds = [e["kind"] for e in http.get(f"/jobs/{job['id']}/events").json()["data"]]
        checkpoints = [c["step"] for c in http.get(f"/jobs/{job['id']}/checkpoints").json()["data"]]
        print(f"events: {' -> '.join(dict.fromkeys(kinds))}\ncheckpoints at steps {checkpoints}")

        archive = http.get(f"/jobs/{job['id']}/adapter")
        archive.raise_for_status()
        with tarfile.open(fileobj=io.BytesIO(archive.content), mode="r:gz") as tar:
            tar.extractall(OUT / "download", filter="data")
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(str(base_dir)), str(OUT / "download" / "adapter")
        )
        print(f"adapter downloaded to {OUT / 'download' / 'adapter'} and loaded with peft")
        accuracy = f"eval/avg@{body['eval']['n']}"
        curve = [(r["step"], r[accuracy]) for r in rows if accuracy in r]
        plot = plot_metrics(rows, OUT / "metrics.png", [accuracy, *DEFAULT_PLOTS], title=job["id"])
        print(f"plot: {plot}")
        problems = len(heldout_path.read_text().splitlines())
        print(
            f"held-out accuracy ({accuracy} on {problems} problems never trained on): "
            + " -> ".join(f"step {step}: {100 * value:.1f}%" for step, value in curve)
        )
        if args.quick:
            print("quick run: the service path works (no accuracy claim for 4 steps)")
        elif len(curve) < 2 or curve[-1][1] <= curve[0][1]:
            raise SystemExit("OPSD did not raise held-out accuracy above the base's")
        else:
            print(
                f"OPSD raised held-out accuracy from {100 * curve[0][1]:.1f}% (the base) to "
                f"{100 * curve[-1][1]:.1f}% in {args.steps} steps, one rollout per problem."
            )
        if args.keep_running:
            print(f"service still running at {base_url}; key: {key}; Ctrl-C to stop")
            service.wait()
    finally:
        if service.poll() is None:
            service.send_signal(signal.SIGTERM)
            service.wait(timeout=60)


if __name__ == "__main__":
    main()
