"""The telemetry producer's timing and retry policy: timeouts, probe backoff, batching.

Kept apart from `_producer` (the task that applies them) so the figures are in one place.
"""

from __future__ import annotations

import itertools
import os
import secrets

from aiokafka.errors import LeaderNotAvailableError, NotLeaderForPartitionError, UnknownTopicOrPartitionError
from tenacity import RetryCallState, Retrying, wait_exponential, wait_random_exponential

from sidecar.telemetry._telemetry_queue import BATCH_MAX

BACKOFF_INITIAL_S = 0.1
BACKOFF_MAX_S = 2.0
# the delay before the next probe after the nth failure in a row: min(BACKOFF_MAX_S,
# BACKOFF_INITIAL_S * 2**(n - 1)) times a uniform 0.5 to 1.0 jitter (half of it fixed, the
# other half tenacity's full jitter)
BACKOFF = wait_exponential(multiplier=BACKOFF_INITIAL_S / 2, max=BACKOFF_MAX_S / 2) + wait_random_exponential(
    multiplier=BACKOFF_INITIAL_S / 2, max=BACKOFF_MAX_S / 2
)
# short, so an outage is noticed in a few seconds and records move to the spill
PRODUCER_REQUEST_TIMEOUT_MS = 3_000
PRODUCER_RETRY_BACKOFF_MS = 200
# a whole batch (metadata wait + delivery) gets this long before it counts as failed
SEND_TIMEOUT_S = 2 * PRODUCER_REQUEST_TIMEOUT_MS / 1000 + 1
# a send refused with a retriable error (not a timeout) is retried this often before spilling
SEND_RETRIES = 3
SEND_RETRY_DELAY_S = 0.2
# a batch is taken this long after its first record was queued, unless LINGER_UNTIL records
# are waiting already (or the producer is stopping)
LINGER_S = 0.02
LINGER_UNTIL = BATCH_MAX // 2
# how often a topic found missing is looked up again
TOPIC_RECHECK_S = 60.0
# when the configured directory is held by another live sidecar, try <dir>.1 .. <dir>.N
SPILL_DIR_ALTERNATES = 8


class _EventIds:
    """Event ids: 80 random bits per process, then a counter (32 hex digits, as a uuid4's
    hex). They only need to be unique (the collector dedupes by them; they authenticate
    nothing), and this is, without a urandom syscall and a UUID per event. A forked child
    draws its own prefix."""

    def __init__(self) -> None:
        self.reseed()
        os.register_at_fork(after_in_child=self.reseed)

    def reseed(self) -> None:
        self.prefix, self.counter = secrets.token_hex(10), itertools.count()

    def next(self) -> str:
        return f"{self.prefix}{next(self.counter):012x}"


_EVENT_IDS = _EventIds()


def new_event_id() -> str:
    """A fresh event id: what the collector's dedupe tells events apart by."""
    return _EVENT_IDS.next()


_TRANSIENT = (NotLeaderForPartitionError, LeaderNotAvailableError, UnknownTopicOrPartitionError)


def transient(exc: BaseException) -> bool:
    """A partition between leaders or a topic being created: worth a quick retry. Anything
    else (unreachable node, timeout) is an outage and goes to the spill at once."""
    return isinstance(exc, _TRANSIENT)


# the probe is scheduled between batches, not a blocking loop: tenacity's wait strategy is
# asked for the delay with the number of failures in a row as the attempt number
_PROBING = Retrying(wait=BACKOFF)  # only carries the wait strategy; never called


def probe_delay(failures: int) -> float:
    state = RetryCallState(retry_object=_PROBING, fn=None, args=(), kwargs={})
    state.attempt_number = failures
    return float(BACKOFF(state))
