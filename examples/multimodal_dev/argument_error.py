"""``ArgumentError``: a flag, or a combination of flags, that cannot work.

Raised while the flags are parsed (``arguments.parse_args``), before any process group or model
exists; the entry point prints it and exits 2. A module of its own so that the modules owning a
group of flags (``recompute``, ``freezing``) raise it without importing ``arguments``.
"""

__all__ = ["ArgumentError"]


class ArgumentError(ValueError):
    """A flag, or a combination of flags, that cannot work."""
