"""The spec's tenant lists for per-tenant canaries: `opt_in_tenants` and `exclude_tenants`.

Tenant ids as the agent passes them to OpenSession (`tenant_id`), each at most once, and no
tenant in both lists: a tenant cannot both always and never get the candidate. Every rollout
state carries the lists (and the spec's YAML again), so together they stay small enough for
one `outrider.control` record: at most `MAX_TENANT_BYTES` of ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

from pydantic import AfterValidator, Field

MAX_TENANTS = 2_000
MAX_TENANT_ID = 256
MAX_TENANT_BYTES = 64 * 1024  # both lists' ids together, UTF-8


def _unique(tenants: tuple[str, ...]) -> tuple[str, ...]:
    seen: dict[str, int] = {}
    for i, tenant in enumerate(tenants):
        if not tenant.strip():
            raise ValueError(f"entry {i} is empty; a tenant id must not be")
        if tenant in seen:
            raise ValueError(f"tenant {tenant!r} is listed twice (entries {seen[tenant]} and {i})")
        seen[tenant] = i
    return tenants


TenantList = Annotated[
    tuple[Annotated[str, Field(max_length=MAX_TENANT_ID)], ...],
    Field(max_length=MAX_TENANTS),
    AfterValidator(_unique),
]


def check_tenant_lists(opt_in: Sequence[str], excluded: Sequence[str]) -> None:
    """ValueError naming the first tenant that is in both lists, or the lists' size."""
    size = sum(len(t.encode()) for t in (*opt_in, *excluded))
    if size > MAX_TENANT_BYTES:
        raise ValueError(
            f"opt_in_tenants: with exclude_tenants, {size} bytes of tenant ids; at most "
            f"{MAX_TENANT_BYTES} fit on every rollout state"
        )
    both = set(opt_in) & set(excluded)
    if both:
        first = next(t for t in opt_in if t in both)
        raise ValueError(
            f"exclude_tenants: tenant {first!r} is also in opt_in_tenants; a tenant is in one list at most"
        )
