"""The errors only the experiments raise; like every error of adaptune they are AdaptuneErrors (adaptune/errors.py),
and `adaptune` exports them too (from adaptune import DataError, TrainingError)."""
from __future__ import annotations

from ...errors import AdaptuneError


class TrainingError(AdaptuneError, RuntimeError):
    """Training cannot go on: a non-finite loss, gradient or prediction (the message names step and dataset)."""


class DataError(AdaptuneError, ValueError):
    """An experiment's data file is missing or malformed; the message names the file and line."""
