"""One exception family: every error adaptune raises is an AdaptuneError.

The library's errors are here; the experiments' own (DataError, TrainingError) are in
adaptune/experiments/common/errors.py, exported from adaptune as these are."""


class AdaptuneError(Exception):
    """Base class of every error raised by adaptune."""


class ConfigError(AdaptuneError, ValueError):
    """A component or stack was built with invalid arguments."""


class SiteError(AdaptuneError, KeyError):
    """A selector names no site of the model, or a layer out of range."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class BindError(AdaptuneError, ValueError):
    """A component cannot bind to the site it was given."""


class TaskError(AdaptuneError, KeyError):
    """A task name is unknown, or a task operation is not allowed in the current state."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class MergeError(AdaptuneError, RuntimeError):
    """Merging or unmerging low-rank updates failed (non-finite values, wrong state)."""


class LoadError(AdaptuneError, ValueError):
    """A saved adaptation does not fit the model it is loaded into, or the file is invalid."""


class WriteError(AdaptuneError, OSError):
    """A file or directory could not be written; what was at its path before is kept."""
