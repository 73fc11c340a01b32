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


class NonFiniteError(PruneHeadsError):
    """A weight, a statistic or a metric is NaN or infinite: it would pass silently into every later number."""


def shown(value: object, limit: int = 80) -> str:
    """``repr(value)`` bounded in time and size, for error messages: a YAML alias bomb is a list that shares
    itself a billion times over, and a plain ``repr`` of it never ends. Nesting and items are cut by ``reprlib``
    (at most a few thousand elements are visited), then the text is cut to ``limit`` characters."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset, r.maxstring, r.maxother = 3, 4, 4, 4, 4, limit, limit
    text = r.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
