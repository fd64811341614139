"""Stage-independent callbacks."""

from .wintie import WinTieCallback
from .reliability import AtomicCheckpointIO, CorruptCheckpointError, NonFiniteError, NonFiniteGuard, PreemptionCheckpoint
