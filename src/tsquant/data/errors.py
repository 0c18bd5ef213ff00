"""Error type shared by all data loaders."""

from __future__ import annotations


class DataError(ValueError):
    """A dataset is missing, malformed or misconfigured.

    Messages are one line and name both the problem and the fix.
    """
