"""The spill buffer's errors::

    SpillError               an I/O failure; the message names the file
     ├── SpillClosedError    a method needing the files was called before open() or after close()
     └── SpillLockedError    another open buffer (this process or another) holds the directory

Bad input (a record of the wrong type or too large, bad limits) raises TypeError or ValueError
naming the field.
"""


class SpillError(Exception):
    """The spill buffer could not read or write its files."""


class SpillClosedError(SpillError):
    """The buffer is not open."""


class SpillLockedError(SpillError):
    """Another open buffer holds the directory."""
