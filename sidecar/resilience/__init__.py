"""Resilience: what stands between a call and its upstreams.

- `_executor`: one call through breakers, retries and the fallback chain;
- `_breaker`, `_retry`, `_upstreams`: circuit breakers, tenacity retries with jittered backoff and
  retry budgets, kept per upstream;
- `_buckets`, `_quota`, `_global_quota`, `_user_quotas`: token buckets, the global
  tokens-per-minute quota under collector grants, per-user and per-tenant limits.
"""
