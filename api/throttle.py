"""Rate limits of the API: requests per API key and failed authentications per client address.

Built on the `limits` library (moving windows; counters in memory per process by default, or in
Redis with ``OPSD_RATE_LIMIT_STORAGE_URI=redis://…`` so every API process shares them). A
request over a limit is answered 429 ``rate_limited`` with ``Retry-After`` (whole seconds until
the window frees a slot), which the SDK honours. An address that failed authentication too often
gets 429 before its key is even looked up, so guessing keys is throttled.
"""

from __future__ import annotations

import math
import time

from limits import RateLimitItem, parse_many, storage, strategies

from api.errors import APIError


class Throttle:
    """The per-key request limits and the per-address failed-auth limits of one app."""

    def __init__(self, request_limits: str, failed_auth_limits: str, storage_uri: str) -> None:
        self._storage = storage.storage_from_string(storage_uri)
        self._limiter = strategies.MovingWindowRateLimiter(self._storage)
        self._requests = parse_many(request_limits)
        self._failures = parse_many(failed_auth_limits)

    def _retry_after(self, item: RateLimitItem, *identifiers: str) -> int:
        reset = self._limiter.get_window_stats(item, *identifiers).reset_time
        return max(1, math.ceil(reset - time.time()))

    def _refuse(self, item: RateLimitItem, message: str, *identifiers: str) -> APIError:
        after = self._retry_after(item, *identifiers)
        return APIError(
            429,
            "rate_limited",
            f"{message}; retry in {after} s",
            headers={"Retry-After": str(after)},
        )

    def hit_request(self, key_id: str) -> None:
        """Count one request of this key; APIError 429 when a limit is exceeded."""
        for item in self._requests:
            if not self._limiter.hit(item, "key", key_id):
                raise self._refuse(
                    item, f"too many requests for this API key ({item})", "key", key_id
                )

    def check_address(self, address: str) -> None:
        """APIError 429 when this address failed authentication too often recently."""
        for item in self._failures:
            if not self._limiter.test(item, "auth-failure", address):
                raise self._refuse(
                    item, f"too many failed authentications ({item})", "auth-failure", address
                )

    def failed_auth(self, address: str) -> None:
        """Count one failed authentication from this address."""
        for item in self._failures:
            self._limiter.hit(item, "auth-failure", address)
