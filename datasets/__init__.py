"""Readers and augmentations for the satellite datasets used by DINO-MC.

Every reader raises :class:`DataError` for a problem with the data on disk, with a one-line message that
names the file or folder and what was expected, so that scripts can report it cleanly (exit code 2).
"""


class DataError(ValueError):
    """Bad or missing data on disk; the message names the offending path and what was expected."""
