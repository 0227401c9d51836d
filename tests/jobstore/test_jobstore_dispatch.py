"""Resource classes and fair dispatch in the store (issue 14), on both backends.

A job's class is its spec's `resources.gpus`; `claim_next_job` takes the next queued job of one
class in tenant round-robin order under a per-tenant cap on running jobs; `requeue_job` puts a
job whose process group lost a rank back as one unit (or fails it on its last attempt).
"""

from __future__ import annotations

from jobstore import FAILED, QUEUED, RUNNING, JobError, Store
from tests.jobstore.conftest import SPEC, WORKER


def _spec(gpus: int) -> dict:
    return {**SPEC, "resources": {"gpus": gpus, "nodes": 1}}


def _finish(store: Store, job_id: str) -> None:
    assert store.finish_job(job_id, WORKER, adapter_uri="file:///adapters/a")


def test_claims_stay_in_their_resource_class(store, tenant) -> None:
    one, _ = store.create_job(tenant.id, spec=SPEC)  # no resources: class 1
    two, _ = store.create_job(tenant.id, spec=_spec(2))
    assert store.count_queued_in_class(gpus=2) == 1 and store.count_queued_in_class(gpus=1) == 1
    assert store.claim_next_job(WORKER, gpus=8, lease_seconds=60) is None
    claimed = store.claim_next_job(WORKER, gpus=2, lease_seconds=60)
    assert claimed is not None and claimed.id == two.id and claimed.status == RUNNING
    assert store.claim_next_job(WORKER, gpus=2, lease_seconds=60) is None
    first = store.claim_next_job(WORKER, gpus=1, lease_seconds=60)
    assert first is not None and first.id == one.id and first.lease_owner == WORKER


def test_one_worker_serves_tenants_in_turn(store, tenant, other_tenant) -> None:
    """Tenant A queues five jobs before tenant B queues one: B's job is the second to run."""
    many = [store.create_job(tenant.id, spec=SPEC)[0].id for _ in range(5)]
    single, _ = store.create_job(other_tenant.id, spec=SPEC)
    order = []
    while (job := store.claim_next_job(WORKER, gpus=1, lease_seconds=60)) is not None:
        order.append(job.id)
        _finish(store, job.id)  # one worker: one job at a time
    assert order == [many[0], single.id, *many[1:]]


def test_fewest_running_first_and_the_per_tenant_cap(store, tenant, other_tenant) -> None:
    a = [store.create_job(tenant.id, spec=SPEC)[0].id for _ in range(3)]
    b, _ = store.create_job(other_tenant.id, spec=SPEC)
    first = store.claim_next_job(WORKER, gpus=1, lease_seconds=60, max_running_per_tenant=1)
    assert first is not None and first.id == a[0]
    # a second worker: A already runs one (its cap), so B's job goes next although it is newer
    second = store.claim_next_job("w-2", gpus=1, lease_seconds=60, max_running_per_tenant=1)
    assert second is not None and second.id == b.id
    # both tenants at their cap: nothing is claimable although A's jobs wait
    assert store.claim_next_job("w-3", gpus=1, lease_seconds=60, max_running_per_tenant=1) is None
    assert store.count_queued_in_class(gpus=1) == 2
    # without a cap the same claim takes A's next job
    third = store.claim_next_job("w-3", gpus=1, lease_seconds=60)
    assert third is not None and third.id == a[1]


def test_a_group_that_lost_a_rank_is_requeued_as_one_unit(store, tenant) -> None:
    job, _ = store.create_job(tenant.id, spec=_spec(2), max_attempts=2)
    assert store.claim_job(job.id, WORKER, lease_seconds=60) is not None
    lost = JobError("rank_lost", "rank 1 of 2 died (signal SIGKILL)", "system")
    assert store.requeue_job(job.id, "someone-else", error=lost) is None  # not the owner
    assert store.requeue_job(job.id, WORKER, error=lost) == QUEUED
    again = store.get_job(job.id)
    assert again.status == QUEUED and again.attempt == 2 and again.lease_owner is None
    requeued = [e for e in store.list_events(job.id) if e.kind == "requeued"]
    assert requeued[-1].data["error"]["code"] == "rank_lost"
    assert store.claim_job(job.id, WORKER, lease_seconds=60) is not None
    assert store.requeue_job(job.id, WORKER, error=lost) == FAILED  # the last attempt
    failed = store.get_job(job.id)
    assert failed.status == FAILED and failed.error.code == "rank_lost"
