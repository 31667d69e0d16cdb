"""Where collector ingest's instructions go, stage by stage, counted rather than timed.

    scripts/bench collector-breakdown [--events 20000] [--json]

`Ingestor.apply` runs over pre-made records (the collector-ingest bench's synthetic events,
500 a batch, after a first batch of them as warm-up) in a child process under callgrind (valgrind, a
Debian package), which counts only the instructions executed inside those applies. The child
runs once whole and once with each stage below replaced by a no-op; a stage's cost is what
removing it saved. Instruction counts repeat to within 0.2% run to run, whatever else the
machine does (57,146 and 57,183 per event in two runs; 61,828 and 61,713 in two others), so a
change of a percent shows where the CPU-time benches swing by a fifth. They are not time
(stages differ in instructions per cycle), so the targets stay with collector-ingest.

- decode: the records loop, the rows read (off the wire by `collector._fastrow`, or by upb
  and `row_of`), gap tracking and what is not a counted body (everything but `_count`;
  measured as the run with `_count` a no-op);
- windows: dedupe, grouping and the rest of `add_rows` and `_count` (the remainder);
- fold: `fold_rows` without its sketches; sketches: `sketch_add_many`;
- totals: the /metrics totals (`AgentTotals.add_rows`); sightings: `observe_rows`;
- rollout evidence, reported apart: what tracking a canary of one agent of the four adds
  (`EvidenceBook.add_events`, the run with `examples/rollout.yaml` tracked, less the whole);
- upb, reported apart: the whole and its decode again with `OUTRIDER_NATIVE=0`, every event
  read through upb (the path of an install without a C compiler, and the reference).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
NOW_NS = 1_780_000_000 * 10**9  # a fixed stamp: every run folds the same buckets
BATCH = 500  # the collector's default max_batch_records
# stage -> what the child replaces with a no-op ("count": everything after decoding)
ABLATIONS = ("whole", "count", "totals", "sightings", "fold", "sketches", "rollout", "upb", "upb_count")


def _records(n: int, first: int = 0, partition: int = 0) -> list[Any]:
    from aiokafka.structs import ConsumerRecord

    import outrider
    from tests.bench.collector_ingest import synthetic_event

    records = []
    for i in range(first, first + n):
        event = synthetic_event(i, NOW_NS)
        value, headers = outrider.encode_event(event)
        key = outrider.agent_key(event.agent)
        records.append(
            ConsumerRecord(
                outrider.EVENTS_TOPIC,
                partition,
                i - first,
                NOW_NS // 10**6,
                0,
                key,
                value,
                None,
                len(key),
                len(value),
                tuple(headers),
            )
        )
    return records


def _ablate(stage: str) -> None:
    from collector import _buckets, _ingest, _sightings, _totals, _windows

    def nothing(*_: object) -> None:
        return None

    owner, name, stub = {
        "whole": (None, "", nothing),
        "rollout": (None, "", nothing),
        "upb": (None, "", nothing),
        "count": (_ingest.Ingestor, "_count", nothing),
        "upb_count": (_ingest.Ingestor, "_count", nothing),
        "totals": (_totals.AgentTotals, "add_rows", nothing),
        "sightings": (_sightings.VersionSightings, "observe_rows", nothing),
        "fold": (_windows, "fold_rows", nothing),
        "sketches": (_buckets, "sketch_add_many", nothing),
    }[stage]
    if owner is None:
        return
    getattr(owner, name)  # AttributeError when the stage has moved: never a silent no-op
    setattr(owner, name, stub)


def child(stage: str, n: int) -> None:
    """Under callgrind: apply n records in batches, inside `itertools.starmap` (what is counted)."""
    from collector import RollingWindows
    from collector._ingest import Ingestor
    from collector._metrics import CollectorMetrics
    from collector._rows import fast_row

    if (fast_row is None) != stage.startswith("upb"):  # the bench measures the path it says
        raise SystemExit(f"collector._fastrow {'not built' if fast_row is None else 'in use'}: {stage}")
    _ablate(stage)
    records = _records(n, first=BATCH)
    ingestor = Ingestor(
        RollingWindows(bucket_s=5, retention_s=900, dedupe_size=max(200_000, n)), CollectorMetrics()
    )
    now = NOW_NS / 1e9
    if stage == "rollout":
        _track_rollout(ingestor.evidence, now)
    ingestor.apply(_records(BATCH, partition=1), now)  # warm-up: first-use costs not counted
    batches = [(records[i : i + BATCH], now) for i in range(0, n, BATCH)]
    list(itertools.starmap(ingestor.apply, batches))
    if ingestor.applied != n + BATCH:
        raise SystemExit(f"applied {ingestor.applied} records, expected {n + BATCH}")
    if stage == "rollout":
        from tests.bench.collector_ingest import ROLLOUT_AGENT

        evidence = ingestor.evidence.get(ROLLOUT_AGENT)
        if evidence is None or evidence.candidate_requests(0) == 0:
            raise SystemExit("the bench rollout took no evidence")


def _track_rollout(book: Any, now: float) -> None:
    """The example canary spec, for the bench events' rollout, tracked as the collector would."""
    from collector import load_spec_text
    from outrider.v1 import control_pb2
    from tests.bench.collector_ingest import CANDIDATE, ROLLOUT_AGENT, ROLLOUT_ID, STABLE

    text = (ROOT / "examples" / "rollout.yaml").read_text()
    text = re.sub(r"^agent: \S+", f"agent: {ROLLOUT_AGENT}", text, flags=re.MULTILINE)
    text = re.sub(r"^stable: \S+", f"stable: {STABLE}", text, flags=re.MULTILINE)
    text = re.sub(r"^candidate: \S+", f"candidate: {CANDIDATE}", text, flags=re.MULTILINE)
    started = int((now - 60) * 1e9)
    state = control_pb2.RolloutState(
        agent=ROLLOUT_AGENT,
        rollout_id=ROLLOUT_ID,
        stable_version_id=STABLE,
        candidate_version_id=CANDIDATE,
        started_at_unix_nano=started,
        step_started_at_unix_nano=started,
    )
    if (
        book.sync(state, load_spec_text(text, "bench-rollout.yaml")) is None
        or ROLLOUT_AGENT not in book.tracked()
    ):
        raise SystemExit("the bench rollout is not tracked")


def _instructions(stage: str, n: int, workdir: Path) -> int:
    out = workdir / f"{stage}.callgrind"
    command = [
        "valgrind", "--tool=callgrind", "--collect-atstart=no", "--toggle-collect=starmap_next",
        f"--callgrind-out-file={out}", sys.executable, "-m", "tests.bench.collector_breakdown",
        "--child", stage, "--events", str(n),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONHASHSEED": "0"}  # the same hashes, so the same dict probes, every run
    env["OUTRIDER_NATIVE"] = "0" if stage.startswith("upb") else "1"
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, check=False, timeout=1800
    )
    if done.returncode != 0:
        raise SystemExit(f"the {stage} run failed:\n{done.stderr[-2000:]}")
    for line in out.read_text().splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1])
    raise SystemExit(f"no instruction total in {out}")


def run(n: int) -> dict[str, Any]:
    # two at a time: a count does not depend on the other run, and the machine has two cores
    with (
        tempfile.TemporaryDirectory(prefix="outrider-breakdown-") as tmp,
        concurrent.futures.ThreadPoolExecutor(2) as pool,
    ):
        counts = dict(
            zip(ABLATIONS, pool.map(lambda s: _instructions(s, n, Path(tmp)), ABLATIONS), strict=True)
        )
    per = {stage: count / n for stage, count in counts.items()}
    whole = per["whole"]
    stages = {
        "decode": per["count"],
        "totals": whole - per["totals"],
        "sightings": whole - per["sightings"],
        "fold": per["sketches"] - per["fold"],
        "sketches": whole - per["sketches"],
    }
    stages["windows"] = whole - sum(stages.values())
    return {
        "benchmark": "collector-breakdown",
        "events": n,
        "instructions_per_event": round(whole),
        # a quarter of the events are the tracked rollout's: per event of all, and per event of it
        "rollout_evidence_per_event": round(per["rollout"] - whole),
        "instructions_per_event_with_rollout": round(per["rollout"]),
        # every event through upb (OUTRIDER_NATIVE=0): the whole, and its decode stage
        "upb_instructions_per_event": round(per["upb"]),
        "upb_decode_per_event": round(per["upb_count"]),
        "stages": {
            name: {"instructions_per_event": round(value), "share": round(value / whole, 3)}
            for name, value in sorted(stages.items(), key=lambda item: -item[1])
        },
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="scripts/bench collector-breakdown", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--json", action="store_true", help="one JSON object on the last line")
    parser.add_argument("--child", choices=ABLATIONS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.events < BATCH:
        parser.error(f"--events must be at least {BATCH}")
    if args.child:
        child(args.child, args.events)
        return
    if shutil.which("valgrind") is None:
        parser.error("needs valgrind (Debian: apt-get install valgrind)")
    result = run(args.events)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['instructions_per_event']:,} instructions per event applied ({args.events:,} events)")
    for name, stage in result["stages"].items():
        print(f"  {name:<10} {stage['instructions_per_event']:>8,}  {stage['share']:6.1%}")
    print(
        f"with a canary of one agent tracked: {result['instructions_per_event_with_rollout']:,}"
        f" (its evidence: +{result['rollout_evidence_per_event']:,} per event)"
    )
    print(
        f"every event through upb (OUTRIDER_NATIVE=0): {result['upb_instructions_per_event']:,}"
        f" (decode {result['upb_decode_per_event']:,})"
    )


if __name__ == "__main__":  # the child, under callgrind
    main(sys.argv[1:])
