"""Stage-independent callbacks."""

from .reliability import (
    AtomicCheckpointIO,
    CorruptCheckpointError,
    NonFiniteError,
    NonFiniteGuard,
    PreemptionCheckpoint,
)
from .wintie import WinTieCallback

__all__ = ["AtomicCheckpointIO", "CorruptCheckpointError", "NonFiniteError", "NonFiniteGuard",
           "PreemptionCheckpoint", "WinTieCallback"]
