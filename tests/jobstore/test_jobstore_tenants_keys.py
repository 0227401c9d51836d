"""Tenants and API keys: keys are stored hashed, authenticate accepts only live well-formed keys,
``last_used_at`` is throttled."""

from __future__ import annotations

import hashlib
import threading
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from jobstore import Store
from jobstore.tables import api_keys


def _key_rows(store: Store) -> list[dict[str, object]]:
    with store.engine.connect() as connection:
        return [dict(row._mapping) for row in connection.execute(sa.select(api_keys))]


def test_get_or_create_tenant_is_idempotent(store: Store) -> None:
    first = store.get_or_create_tenant("acme")
    again = store.get_or_create_tenant("acme")
    other = store.get_or_create_tenant("globex")
    assert first == again
    assert first.id.startswith("ten_") and len(first.id) == 30
    assert other.id != first.id
    assert first.created_at.tzinfo is not None and first.created_at.utcoffset() == timedelta(0)
    assert store.get_tenant(first.id) == first
    assert store.get_tenant("ten_missing") is None
    with pytest.raises(ValueError):
        store.get_or_create_tenant("")


def test_concurrent_get_or_create_makes_one_tenant(store: Store) -> None:
    barrier = threading.Barrier(6)
    results = []

    def create() -> None:
        barrier.wait()
        results.append(store.get_or_create_tenant("race"))

    threads = [threading.Thread(target=create) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 6 and len({t.id for t in results}) == 1


def test_api_key_is_returned_once_and_stored_hashed(store: Store) -> None:
    key = store.create_api_key("acme", label="ci")
    assert key.startswith("opsd_")
    _, prefix, secret = key.split("_", 2)
    assert len(secret) >= 32
    [row] = _key_rows(store)
    assert row["prefix"] == prefix
    assert row["key_hash"] == hashlib.sha256(secret.encode()).hexdigest()
    assert row["label"] == "ci"
    assert row["tenant_id"] == store.get_or_create_tenant("acme").id
    for value in row.values():  # neither the key nor its secret is anywhere in the row
        assert key not in str(value) and secret not in str(value)


def test_authenticate_good_bad_malformed(store: Store) -> None:
    key = store.create_api_key("acme")
    other_key = store.create_api_key("globex")
    acme = store.authenticate(key)
    assert acme is not None and acme.name == "acme"
    assert store.authenticate(other_key).name == "globex"  # type: ignore[union-attr]
    _, prefix, secret = key.split("_", 2)
    wrong_secret = f"opsd_{prefix}_{secret[:-1]}{'A' if secret[-1] != 'A' else 'B'}"
    unknown_prefix = f"opsd_{'0' * len(prefix)}_{secret}"
    other_prefix = f"opsd_{other_key.split('_', 2)[1]}_{secret}"
    malformed = [
        "",
        "opsd",
        "opsd_",
        f"opsd__{secret}",
        f"opsd_{prefix}_",
        f"xopsd_{prefix}_{secret}",
        f"Bearer {key}",
        key.replace("opsd_", "OPSD_", 1),
        key + "x" * 300,
        "é" * 10,
    ]
    for bad in [wrong_secret, unknown_prefix, other_prefix, *malformed]:
        assert store.authenticate(bad) is None, bad
    assert store.authenticate(None) is None  # type: ignore[arg-type]


def test_revoked_key_no_longer_authenticates(store: Store) -> None:
    key = store.create_api_key("acme")
    keep = store.create_api_key("acme")
    assert store.authenticate(key) is not None
    assert store.revoke_api_key(key)
    assert not store.revoke_api_key(key)  # already revoked
    assert store.authenticate(key) is None
    assert store.authenticate(keep) is not None
    assert store.revoke_api_key(keep.split("_", 2)[1])  # by prefix
    assert store.authenticate(keep) is None
    assert not store.revoke_api_key("nope")


def test_last_used_at_is_written_at_most_once_a_minute(store: Store) -> None:
    key = store.create_api_key("acme")
    assert _key_rows(store)[0]["last_used_at"] is None
    store.authenticate(key)
    first = _key_rows(store)[0]["last_used_at"]
    assert isinstance(first, datetime)
    store.authenticate(key)
    store.authenticate(key)
    assert _key_rows(store)[0]["last_used_at"] == first
    long_ago = datetime.now(UTC) - timedelta(minutes=5)
    with store.engine.begin() as connection:
        connection.execute(sa.update(api_keys).values(last_used_at=long_ago))
    store.authenticate(key)
    assert _key_rows(store)[0]["last_used_at"] > long_ago + timedelta(minutes=4)  # type: ignore[operator]


def test_count_api_keys(store: Store) -> None:
    assert store.count_api_keys() == 0
    store.create_api_key("acme")
    key = store.create_api_key("globex")
    store.revoke_api_key(key)
    assert store.count_api_keys() == 2


def test_ping(store: Store) -> None:
    assert store.ping()


def test_ping_is_false_when_the_database_is_unreachable() -> None:
    unreachable = Store("postgresql+psycopg://postgres@127.0.0.1:1/nothing")
    try:
        assert unreachable.ping() is False
    finally:
        unreachable.close()
