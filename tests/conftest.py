"""Fixtures shared by every suite: the embedded broker and free loopback ports.

Every Kafka test (the `broker` fixture or mark) ends with a garbage collection, so an
unclosed client (an aiokafka connection or producer warns when collected, an error under
filterwarnings=error) fails the test that leaked it rather than whichever later test the
collector happened to run in. What import and collection made is frozen first, so these
collections scan only what the tests made (unit tests skip it: ~20 ms each adds up).

Hypothesis runs without its per-example deadline: a deadline measures the machine (two
workers on two cores, PYTHONASYNCIODEBUG), not the property; tests that set one keep it.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
from hypothesis import settings

from devstack.broker import BrokerError, EmbeddedBroker, free_port

settings.register_profile("outrider", deadline=None)
settings.load_profile("outrider")


def pytest_collection_finish(session: pytest.Session) -> None:
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def _collect_garbage(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "broker" in request.fixturenames or request.node.get_closest_marker("broker"):
        gc.collect()


@pytest.fixture
def broker() -> Iterator[EmbeddedBroker]:
    """A fresh embedded Kafka-protocol broker per test (it starts in well under a second).
    Its port was free a moment ago; a test beside this one (xdist) may take it meanwhile, so
    a broker that cannot listen is tried again on another port."""
    for attempt in range(3):
        b = EmbeddedBroker()
        try:
            b.start()
        except BrokerError:
            if attempt == 2:
                raise
            continue
        try:
            yield b
        finally:
            b.stop()
        return


@pytest.fixture
def port() -> int:
    return free_port()
