"""The spec's tenant lists for per-tenant canaries: `opt_in_tenants` and `exclude_tenants`.

Tenant ids as the agent passes them to OpenSession (`tenant_id`), each at most once, and no
tenant in both lists: a tenant cannot both always and never get the candidate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

from pydantic import AfterValidator, Field

MAX_TENANTS = 10_000
MAX_TENANT_ID = 256


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
    """ValueError naming the first tenant that is in both lists."""
    both = set(opt_in) & set(excluded)
    if both:
        first = next(t for t in opt_in if t in both)
        raise ValueError(
            f"exclude_tenants: tenant {first!r} is also in opt_in_tenants; a tenant is in one list at most"
        )
