"""Errors the index raises: each names the input at fault so a batch job can record it and go on."""

from __future__ import annotations


class VectorIndexError(ValueError):
    """Base class for bad index input or state (a ValueError, so callers can catch either)."""


class IndexFormatError(VectorIndexError):
    """The directory is not a voxsearch index, or was written by an incompatible version."""


class IndexCorruptError(VectorIndexError):
    """A file of a saved index does not match its manifest (checksum, size, count or dimension)."""


class ReadOnlyIndexError(VectorIndexError):
    """A memory-mapped index was asked to change; reload it without mmap to modify it."""
