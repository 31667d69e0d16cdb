"""Fixtures shared by every suite: the embedded broker and free loopback ports."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from devstack.broker import EmbeddedBroker, free_port


@pytest.fixture
def broker() -> Iterator[EmbeddedBroker]:
    """A fresh embedded Kafka-protocol broker per test (it starts in well under a second)."""
    with EmbeddedBroker() as b:
        yield b


@pytest.fixture
def port() -> int:
    return free_port()
