"""Teachers: loading (built-in, local, GGUF, hub) and per-family layout adapters."""

from .families import FAMILIES, FamilyAdapter, UnsupportedTeacherError, adapter_for
from .spec import BUILTIN_TEACHERS, TeacherSpec, cache_root, resolve_tokenizer

__all__ = [
    "BUILTIN_TEACHERS",
    "FAMILIES",
    "FamilyAdapter",
    "TeacherSpec",
    "UnsupportedTeacherError",
    "adapter_for",
    "cache_root",
    "resolve_tokenizer",
]
