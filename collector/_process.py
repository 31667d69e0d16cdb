"""Running a collector as a process: until SIGTERM or SIGINT, then a bounded, clean stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading

from collector._service import Collector
from collector._settings import CollectorSettings

log = logging.getLogger(__name__)


async def run(settings: CollectorSettings, *, hard_exit: bool = False) -> int:
    """Run a collector until SIGTERM or SIGINT, then stop it cleanly. The exit code.

    A signal during start-up stops at once. The stop gets `shutdown_grace_s`: past it the
    remaining steps are abandoned (exit code 1); with `hard_exit` (the command line), a
    watchdog thread ends the process even if the event loop is stuck."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stopping.set)
    collector = Collector(settings)
    grace = settings.shutdown_grace_s
    code = 0
    signalled = asyncio.create_task(stopping.wait())
    try:
        starting = asyncio.create_task(collector.start())
        await asyncio.wait({starting, signalled}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            log.info("collector: signalled during start-up; stopping")
            starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting  # a start that failed raises here
        if not starting.cancelled():
            where = f"admin gRPC {collector.admin_address}"
            if collector.metrics_port is not None:
                where += f", metrics http://{settings.metrics_host}:{collector.metrics_port}/metrics"
            log.info("collector listening: %s", where)
            await signalled
        log.info("collector stopping (grace %.1fs)", grace)
    finally:
        signalled.cancel()
        watchdog = _watchdog(grace + 1.0) if hard_exit else None
        try:
            await asyncio.wait_for(collector.stop(), grace)
        except TimeoutError:
            log.error("collector: stop did not finish within %.1fs; exiting anyway", grace)  # noqa: TRY400
            code = 1
        finally:
            if watchdog is not None:
                watchdog.cancel()
            for sig in signals:
                loop.remove_signal_handler(sig)
    return code


def _watchdog(after_s: float) -> threading.Timer:
    def expire() -> None:
        log.critical("collector: still stopping after %.1fs; exiting", after_s)
        os._exit(1)

    timer = threading.Timer(after_s, expire)
    timer.daemon = True
    timer.start()
    return timer
