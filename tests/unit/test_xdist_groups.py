"""The xdist groups hold: tests that share a file in the checkout must run on one worker.

`--dist loadgroup` works by suffixing each marked test's node id with `@group`; the scheduler
then sends every id with one suffix to one worker. A pytest or pytest-xdist release that
breaks that suffix leaves the marks silently ignored, and the README demos that share
`.outrider/agent.log` would then race. This fails instead.
"""

from __future__ import annotations

import os

import pytest


@pytest.mark.xdist_group("xdist-group-guard")
def test_a_marked_test_carries_its_group_under_loadgroup(request: pytest.FixtureRequest) -> None:
    # xdist sets `loadgroup` on each worker from the controller's --dist
    loadgroup = getattr(request.config.option, "loadgroup", False)
    if not os.environ.get("PYTEST_XDIST_WORKER") or not loadgroup:
        pytest.skip("only meaningful on an xdist worker with --dist loadgroup (scripts/check)")
    assert request.node.nodeid.endswith("@xdist-group-guard"), (
        f"xdist_group ignored: node id {request.node.nodeid!r} has no @group suffix, so "
        "--dist loadgroup will spread grouped tests over workers (check the pytest pin)"
    )
