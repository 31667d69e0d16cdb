"""The one native module: collector._fastrow (the ingest's rows, read off the wire).

Everything else is in pyproject.toml. `optional`: where no C compiler is found the install
still succeeds and the collector reads rows through upb (collector._rows says which).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("collector._fastrow", ["collector/_fastrow.c"], optional=True, extra_compile_args=["-O2"])
    ]
)
