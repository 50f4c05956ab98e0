"""User-facing errors.

A `CvqdError` is a mistake in what the user gave us (a path, a flag, a file), never a bug: the
command-line front ends print its message on one line and exit with status 2, without a traceback.
Internal invariants use `assert`.
"""


class CvqdError(Exception):
    """Bad input: the message says what was wrong and what is expected."""


class CheckpointError(CvqdError):
    """A file that is not a readable cvqd checkpoint of a supported format version."""


class ConfigError(CvqdError):
    """A configuration that cannot describe a model (unknown keys, bad values, unknown preset)."""
