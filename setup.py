"""The collector's C modules: `_fastrow` (the ingest's rows, read off the wire) and `_fastsketch`
(latencies into the sketches). Everything else is in pyproject.toml.

`optional`: where no C compiler is found the install still succeeds, and the collector takes
the pure-Python twins (collector._native). No -ffast-math, and no contraction into fused
multiply-adds: the sums and keys must come out as the Python code's do, bit for bit.
"""

from setuptools import Extension, setup

FLAGS = ["-O2", "-ffp-contract=off"]

setup(
    ext_modules=[
        Extension(f"collector.{name}", [f"collector/{name}.c"], optional=True, extra_compile_args=FLAGS)
        for name in ("_fastrow", "_fastsketch")
    ]
)
