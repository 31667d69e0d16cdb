from collector._rows import Row

KNOWN_FIELDS: dict[str, tuple[int, ...]]

def read_row(value: bytes, /) -> tuple[Row, tuple[str, str, int] | None] | None: ...
