"""The package's own error types."""

from __future__ import annotations


class ConfigError(ValueError):
    """An invalid configuration (a model or environment option), found before anything runs.

    Its message names the option, what is wrong and the fix; the ``fp3o`` commands print it alone, without
    a traceback, and exit with status 2, as for the parser's own errors.
    """
