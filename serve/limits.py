"""Tenant limits at the API: `registry.limits` checks, answered in the API's error shape.

429 (`Retry-After`) for the job caps, which clear as jobs end; 403 for the storage cap and a
job cap of 0, plan limits. The message names the limit and the tenant's current use; `code`
is `<limit>_exceeded`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

from registry.limits import LimitExceeded, TenantLimits
from registry.storage import StorageError
from serve.errors import APIError, StorageUnavailable


def limit_error(e: LimitExceeded) -> APIError:
    if e.retryable:
        return APIError(429, str(e), code=f"{e.limit}_exceeded", headers={"Retry-After": "30"})
    return APIError(403, str(e), code=f"{e.limit}_exceeded")


class LimitGuard:
    """What the feature services call; a service built without one checks nothing."""

    def __init__(self, limits: TenantLimits) -> None:
        self.limits = limits

    def check_stored_bytes_now(self, tenant_id: str, adding: int = 0) -> None:
        try:
            self.limits.check_stored_bytes(tenant_id, adding)
        except LimitExceeded as e:
            raise limit_error(e) from None
        except StorageError as e:  # the listing failed: the store is down for writes too
            raise StorageUnavailable() from e

    async def check_stored_bytes(self, tenant_id: str, adding: int = 0) -> None:
        await asyncio.to_thread(self.check_stored_bytes_now, tenant_id, adding)

    def stored(self, tenant_id: str, nbytes: int) -> None:
        self.limits.stored(tenant_id, nbytes)

    @contextmanager
    def admit_job(self, tenant_id: str, idempotency_key: str | None) -> Iterator[None]:
        """Refuse a new job over a cap; the body records the job under the admission lock."""
        with self.limits.admission(tenant_id):
            try:
                self.limits.check_new_job(tenant_id, idempotency_key)
            except LimitExceeded as e:
                raise limit_error(e) from None
            except StorageError as e:
                raise StorageUnavailable() from e
            yield
