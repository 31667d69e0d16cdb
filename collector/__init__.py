"""The Outrider control plane: consumes events, keeps rolling windows per version and the
evidence of every rollout, decides each rollout with anytime-valid tests and publishes each
decision to `outrider.control`."""

from collector._book import EvidenceBook
from collector._config_errors import SpecError
from collector._errors import NoRollout, RolloutConflict, RolloutError, RolloutFinished, WrongPhase
from collector._evidence import RolloutEvidence, Rows
from collector._manager import PublishError
from collector._process import run
from collector._rollout import RolloutController
from collector._service import Collector
from collector._settings import CollectorSettings, load_settings
from collector._shadow_evidence import ShadowEvidence, ShadowRows
from collector._shadow_spec import Shadow, ShadowGate
from collector._spec import Gate, RolloutSpec, Step, Trigger, load_spec_file, load_spec_text
from collector._windows import Ingest, RollingWindows, WindowStats
from outrider.clock import Clock, ManualClock, SystemClock

__all__ = [
    "Clock",
    "Collector",
    "CollectorSettings",
    "EvidenceBook",
    "Gate",
    "Ingest",
    "ManualClock",
    "NoRollout",
    "PublishError",
    "RollingWindows",
    "RolloutConflict",
    "RolloutController",
    "RolloutEvidence",
    "RolloutError",
    "RolloutFinished",
    "RolloutSpec",
    "Rows",
    "Shadow",
    "ShadowEvidence",
    "ShadowGate",
    "ShadowRows",
    "SpecError",
    "Step",
    "SystemClock",
    "Trigger",
    "WindowStats",
    "WrongPhase",
    "load_settings",
    "load_spec_file",
    "load_spec_text",
    "run",
]
