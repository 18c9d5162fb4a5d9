"""The one error type of the training pipeline: a problem the user can fix (a path, a flag,
a dataset that does not fit the model). The CLI prints its message, never a traceback."""

from __future__ import annotations


class TrainingError(Exception):
    """A bad --data/--init/--out/--resume, or a dataset that does not fit the model."""
