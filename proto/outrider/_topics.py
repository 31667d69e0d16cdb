"""Kafka topic names and record keys (DESIGN.md, "Kafka")."""

from __future__ import annotations

EVENTS_TOPIC = "outrider.events"
SPANS_TOPIC = "outrider.spans"
CONTROL_TOPIC = "outrider.control"
COMMANDS_TOPIC = "outrider.commands"
DEADLETTER_TOPIC = "outrider.deadletter"
# compacted: one signed DeploymentRecord per ended rollout, keyed by its rollout id
DEPLOYMENTS_TOPIC = "outrider.deployments"


def agent_key(agent: str) -> bytes:
    """The record key for everything about one agent: keeps its records on one partition."""
    if not agent:
        raise ValueError("agent name must not be empty")
    return agent.encode("utf-8")


# keys on `outrider.control`: one per kind, so compaction never drops one kind for another
ROLLOUT_KEY_PREFIX = "rollout/"
FLAG_KEY_PREFIX = "flag/"
QUOTA_KEY_PREFIX = "quota/"
# records a reader writes to find the end of the topic (then deletes with a tombstone);
# never signed, never applied
MARKER_KEY_PREFIX = "marker/"


def rollout_key(agent: str) -> bytes:
    """`rollout/<agent>`: the record key of an agent's rollout state."""
    if not agent:
        raise ValueError("agent name must not be empty")
    return (ROLLOUT_KEY_PREFIX + agent).encode("utf-8")


def flag_key(agent: str, name: str) -> bytes:
    """`flag/<agent>/<name>`: the record key of a feature flag."""
    if not agent or not name:
        raise ValueError("agent and flag name must not be empty")
    return f"{FLAG_KEY_PREFIX}{agent}/{name}".encode()


def quota_key(resource: str) -> bytes:
    """`quota/<resource>`: the record key of a global quota's grants."""
    if not resource:
        raise ValueError("resource must not be empty")
    return (QUOTA_KEY_PREFIX + resource).encode("utf-8")


def deployment_key(rollout_id: str) -> bytes:
    """The record key of a rollout's deployment record on `outrider.deployments`: its id."""
    if not rollout_id:
        raise ValueError("rollout id must not be empty")
    return rollout_id.encode("utf-8")


# `outrider.versions` (compacted): one signed record per pushed version, `<agent>/<version id>`
VERSIONS_TOPIC = "outrider.versions"


def version_key(agent: str, version_id: str) -> bytes:
    """`<agent>/<version id>`: the record key of a pushed version."""
    if not agent or not version_id:
        raise ValueError("agent and version id must not be empty")
    return f"{agent}/{version_id}".encode()
