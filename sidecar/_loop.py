"""The sidecar process's event loop: uvloop when it is installed, else asyncio's own.

uvloop (libuv, Cython) runs the same sidecar with less CPU per call than the default loop
(see `scripts/bench sidecar-telemetry`). It is a dependency, but the import is guarded so a
platform without a wheel still runs; `OUTRIDER_UVLOOP=0` selects the default loop.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

log = logging.getLogger(__name__)

UVLOOP_ENV = "OUTRIDER_UVLOOP"
_T = TypeVar("_T")


def uvloop_wanted(environ: dict[str, str] | os._Environ[str] | None = None) -> bool:
    value = (os.environ if environ is None else environ).get(UVLOOP_ENV, "1").strip().lower()
    return value not in ("0", "false", "no", "off")


def run(main: Coroutine[Any, Any, _T]) -> _T:
    """`asyncio.run(main)` on uvloop when installed and wanted."""
    if uvloop_wanted():
        try:
            import uvloop
        except ImportError:
            log.debug("uvloop is not installed: the default asyncio loop runs the sidecar")
        else:
            return uvloop.run(main)
    return asyncio.run(main)


def freeze_startup_objects() -> None:
    """Move everything allocated at start-up (modules, config, clients) out of the cyclic
    GC's view, so a collection walks only what calls allocate: shorter, rarer GC pauses."""
    gc.collect()
    gc.freeze()
