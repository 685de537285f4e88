"""Saved models: the sharded training checkpoint (``sharded``), the consolidated single
file (``consolidated``) and ``open_saved``, the one way every reader opens either."""

from megagnn.checkpoint.errors import CheckpointError
from megagnn.checkpoint.saved import Saved, open_saved
from megagnn.checkpoint.sharded import BEST, LATEST

__all__ = ["BEST", "LATEST", "CheckpointError", "Saved", "open_saved"]
