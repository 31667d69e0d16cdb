"""Debian's `prometheus` package for the tests: `promtool` and the `prometheus` server.

Without the binary a test skips locally (`bash scripts/system-deps` installs it) but fails under
CI, where `.ci/run` installs it: a CI run that silently skipped the rule tests would pass
with none of them run.
"""

from __future__ import annotations

import os
import shutil

import pytest

INSTALL_HINT = "install Debian's prometheus package: bash scripts/system-deps"


def in_ci() -> bool:
    """CI runners set CI (to `true`); `CI=false` or `CI=0` count as not set."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def prometheus_binary(name: str) -> str:
    """The path of `name` (promtool, prometheus); skip without it, or fail under CI."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found on PATH ({INSTALL_HINT})"
        if in_ci():
            pytest.fail(f"{message}; CI must run the Prometheus rule tests", pytrace=False)
        pytest.skip(message)
    return path
