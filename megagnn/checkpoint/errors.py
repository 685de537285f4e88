"""The one error every reader of saved models raises."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A saved model is missing, incomplete, corrupt or does not fit; the message names the
    file. An ``Exception`` (torch's own CheckpointException is a BaseException, which
    ``except Exception`` does not catch: readers convert it to this)."""
