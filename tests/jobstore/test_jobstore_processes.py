"""Several processes on one database (an API and workers, as in the embedded SQLite setup): they
all write at once without "database is locked" errors, and each job is claimed by one of them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from jobstore import SUCCEEDED, Store, TenantRecord

REPO = Path(__file__).resolve().parents[2]

WORKER_SCRIPT = """
import json, sys
import jobstore

url, name, ids_file = sys.argv[1:4]
store = jobstore.Store(url)
tenant = store.get_or_create_tenant("acme")
job_ids = json.loads(open(ids_file).read())
print("ready", flush=True)
sys.stdin.readline()
won = []
for i, job_id in enumerate(job_ids):
    # the API side of this process: new jobs, listings, reads
    store.create_job(tenant.id, spec={"by": name, "i": i}, idempotency_key=f"{name}-{i}")
    store.list_jobs(tenant.id, limit=5)
    # the worker side: race the other processes for the job
    job = store.claim_job(job_id, name, lease_seconds=60)
    if job is None:
        continue
    won.append(job_id)
    store.record_metrics(job_id, 1, {"loss": 1.0, "by_" + name: 1.0})
    store.add_event(job_id, "log", f"hello from {name}")
    assert store.heartbeat(job_id, name, lease_seconds=60) == "running"
    store.add_checkpoint(job_id, 1, f"file:///ckpt/{job_id}")
    assert store.finish_job(job_id, name, adapter_uri=f"file:///adapters/{job_id}")
store.close()
print(json.dumps(won))
"""


def test_processes_share_the_database(
    store: Store, database_url: str, tenant: TenantRecord, tmp_path: Path
) -> None:
    job_ids = [store.create_job(tenant.id, spec={"i": i})[0].id for i in range(15)]
    ids_file = tmp_path / "ids.json"
    ids_file.write_text(json.dumps(job_ids))
    names = [f"proc{i}" for i in range(3)]
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER_SCRIPT, database_url, name, str(ids_file)],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in names
    ]
    for process in processes:  # start all at once, after their imports
        assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    won: dict[str, list[str]] = {}
    for name, process in zip(names, processes, strict=True):
        out, err = process.communicate("go\n", timeout=120)
        assert process.returncode == 0, err
        won[name] = json.loads(out.strip().splitlines()[-1])

    all_won = [job_id for ids in won.values() for job_id in ids]
    assert sorted(all_won) == sorted(job_ids)  # every job claimed exactly once
    for name, ids in won.items():
        for job_id in ids:
            job = store.get_job(job_id)
            assert job is not None and job.status == SUCCEEDED and job.lease_owner == name
            kinds = [event.kind for event in store.list_events(job_id)]
            assert kinds == ["queued", "running", "log", "succeeded"]
            assert store.metric_names(job_id) == sorted(["loss", f"by_{name}"])
    listed = [job for job in store.list_jobs(tenant.id, limit=1000)[0]]
    assert len(listed) == 15 + 15 * len(names)
