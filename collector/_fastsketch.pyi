def add_run(
    values: list[float],
    start: int,
    bins: list[float],
    offset: int,
    low: float,
    high: float,
    total: float,
    multiplier: float,
    ln2: float,
    min_possible: float,
    key_offset: int,
    /,
) -> tuple[int, float, int, int, int]: ...
