"""Data: offline corpora, tokenisation and document-aware packing, the DataModule, the top-k logit cache."""

from .corpora import BUILTIN_CORPORA, Document, split_of
from .datamodule import DistillDataModule
from .logit_cache import LogitCacheError, TopKLogitCache, write_topk_cache

__all__ = [
    "BUILTIN_CORPORA",
    "DistillDataModule",
    "Document",
    "LogitCacheError",
    "TopKLogitCache",
    "split_of",
    "write_topk_cache",
]
