"""Routing: which version serves a session.

- `_session`: signed session tokens that carry the pin (any replica honours them);
- `_router`: the sticky weighted split of new sessions by the rollout state;
- `_versions`: the versions this sidecar serves, built from config and the registry;
- `_control`: the tailer of `outrider.control` (verified rollout states and quota grants);
- `_registry`: the tailer of `outrider.versions` (verified versions, no redeploy);
- `_drain`: sessions pinned to a retired version end at its drain deadline.
"""
