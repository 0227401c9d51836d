"""One rank of a multi-process job: what `torchrun` / `accelerate launch` start on a worker.

``python -m worker.rank_entry SPEC --out DIR --stop-file F --error-dir D [--guard G]`` is the
engine's ``opsd train SPEC --out DIR --resume --stop-file F --no-progress`` (the same
`opsd_engine.local_run.run_local`: rank 0 alone writes DIR's metrics, events, checkpoints and
adapter; the stop file or SIGTERM stop every rank with a checkpoint) plus two things a tenant's
job needs in the service:

* the tenant's dataset guard (`opsd_engine.access.enforcing`), read from the JSON file G that
  the worker wrote (policy, tenant name, the job's uploaded file ids and where they are), so
  every rank checks what it opens as the in-process path does;
* a failure is written to ``D/error-rank<R>.json`` as the readable `JobError` the worker would
  have made in process (`worker.runner.classify_error`), so the watching worker can tell a
  user's mistake (fail the job) from a lost rank (requeue it).

Rank 0 prints the result as the last stdout line (JSON, like the engine's CLI). Exit status: 0
(finished or stopped), 2 (a user error), 1 (anything else).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _guard(path: Path | None) -> Any:
    if path is None:
        return None
    from opsd_engine.access import AccessPolicy, DatasetGuard

    data = json.loads(path.read_text())
    policy = AccessPolicy.parse(data["datasets"], data["base_models"], data["private_hosts"])
    files: dict[str, str] = data["files"]
    return DatasetGuard(policy, data["tenant"], files.get)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.rank_entry")
    parser.add_argument("spec", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stop-file", type=Path, required=True)
    parser.add_argument("--error-dir", type=Path, required=True)
    parser.add_argument("--guard", type=Path, default=None)
    args = parser.parse_args(argv)

    from opsd_engine.local_run import StopRequest

    stop = StopRequest(args.stop_file)
    stop.handle_signals()
    guard = None
    try:
        from opsd_engine.access import enforcing
        from opsd_engine.config import load_spec
        from opsd_engine.local_run import run_local

        guard = _guard(args.guard)
        spec = load_spec(args.spec)
        with enforcing(guard) if guard is not None else nullcontext():
            result = run_local(spec, args.out, resume=True, progress=False, stop=stop)
    except Exception as exc:
        from worker.runner import classify_error

        error = classify_error(exc)
        message = error.message
        if guard is not None and error.category == "user":
            message = guard.public_text(message)
        args.error_dir.mkdir(parents=True, exist_ok=True)
        target = args.error_dir / f"error-rank{_rank()}.json"
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps({**error.to_dict(), "message": message}))
        tmp.rename(target)
        return 2 if error.category == "user" else 1
    if _rank() == 0:
        adapter = str(result.adapter_dir) if result.adapter_dir else None
        print(json.dumps({"status": result.status, "step": result.step, "adapter": adapter}))
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
