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
