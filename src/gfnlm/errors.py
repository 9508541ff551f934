"""Errors that gfnlm raises on bad input.

Every error names the problem and the fix in one line; the command line prints it
as ``error: <message>`` and exits with status 2 instead of showing a traceback.
"""


class GFNLMError(Exception):
    """Base class of gfnlm's user-facing errors (one-line message: problem and fix)."""


class ConfigError(GFNLMError, ValueError):
    """A configuration field is unknown, has the wrong type, or an invalid value."""


class ModelLoadError(GFNLMError):
    """A model name, path or package could not be resolved."""


class DataError(GFNLMError, ValueError):
    """A dataset file is missing or malformed, or a prompt does not fit the model."""


class RewardError(GFNLMError, ValueError):
    """A reward function returned something unusable (NaN, +inf, wrong shape...)."""


def first_line(exc: BaseException, limit: int = 160, default: str = "") -> str:
    """The first line of an exception's message, at most ``limit`` characters (``default`` when it has
    none): what a one-line error quotes of a library's failure."""
    return (str(exc).strip().splitlines() or [default])[0][:limit]
