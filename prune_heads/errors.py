"""Exceptions that carry an actionable message for the CLI to print as is."""


class PruneHeadsError(Exception):
    """Base class: the CLI prints these without a traceback."""


class UnsupportedArchitectureError(PruneHeadsError):
    pass


class ModelMismatchError(PruneHeadsError):
    pass


class OutputExistsError(PruneHeadsError):
    pass


class DataError(PruneHeadsError):
    pass


class BudgetError(PruneHeadsError):
    pass


class OutputOverlapError(PruneHeadsError):
    """An output that is, contains or lies inside an input (writing it would destroy the input)."""


class DiskFullError(PruneHeadsError):
    """The disk (or a quota, or a file-size limit) ran out while writing; nothing half-written is left."""


class LockedError(PruneHeadsError):
    """Another process holds the lock of a shared directory."""
