"""The collector's C modules (setup.py builds them), or None where they are not to be used.

Each has a pure-Python twin that stays the reference, held to it by the tests. None when
`OUTRIDER_NATIVE=0`, or when the install found no C compiler (the modules are optional).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

NATIVE_ENV = "OUTRIDER_NATIVE"


def native(name: str) -> ModuleType | None:
    """`collector.<name>`, or None."""
    if os.environ.get(NATIVE_ENV, "1") == "0":
        return None
    try:
        return importlib.import_module(f"collector.{name}")
    except ImportError:  # built without a C compiler (setup.py: optional)
        return None
