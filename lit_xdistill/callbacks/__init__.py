"""Stage-independent callbacks."""

from .wintie import WinTieCallback

__all__ = ["WinTieCallback"]
