"""RFC 6902 JSON Patch from two JSON documents: what the admission webhook answers with.

The diff walks objects member by member; a list that changed is replaced whole (an injection
prepends an init container and appends volumes, and index-wise ops on a list another webhook
may also edit buy nothing). Keys are escaped as RFC 6901 pointers (`~0`, `~1`): annotation
keys such as `kubectl.kubernetes.io/default-container` contain `/`.
"""

from __future__ import annotations

from typing import Any

Op = dict[str, Any]


def pointer_token(key: str) -> str:
    """One reference token of an RFC 6901 JSON pointer."""
    return key.replace("~", "~0").replace("/", "~1")


def diff(before: Any, after: Any, path: str = "") -> list[Op]:
    """The operations that turn `before` into `after` (empty when they are equal)."""
    if before == after:
        return []
    if isinstance(before, dict) and isinstance(after, dict):
        ops: list[Op] = []
        for key in before:
            if key not in after:
                ops.append({"op": "remove", "path": f"{path}/{pointer_token(key)}"})
        for key, value in after.items():
            child = f"{path}/{pointer_token(key)}"
            if key not in before:
                ops.append({"op": "add", "path": child, "value": value})
            else:
                ops += diff(before[key], value, child)
        return ops
    # a list or a scalar that changed (at "", RFC 6902 replaces the whole document)
    return [{"op": "replace", "path": path, "value": after}]
