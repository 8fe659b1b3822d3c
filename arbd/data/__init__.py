"""Byte corpora and loaders: the built-in stdlib corpus, user data, and deterministic batches."""
from arbd.data.corpus import (
    SEPARATOR,
    VAL_MODULUS,
    Corpus,
    Split,
    default_cache_dir,
    is_val_file,
    list_source_files,
    load_corpus,
    stdlib_corpus,
    stdlib_dir,
)
from arbd.data.loader import ByteBatches, ValWindows, as_byte_array, sample_offsets

__all__ = [
    "SEPARATOR",
    "VAL_MODULUS",
    "ByteBatches",
    "Corpus",
    "Split",
    "ValWindows",
    "as_byte_array",
    "default_cache_dir",
    "is_val_file",
    "list_source_files",
    "load_corpus",
    "sample_offsets",
    "stdlib_corpus",
    "stdlib_dir",
]
