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


class IndexConflictError(VectorIndexError):
    """Another writer saved a new version of the index after this writer read it; reload and re-apply."""

    def __init__(self, directory, expected: str | None, found: str | None):
        self.directory, self.expected, self.found = directory, expected, found
        super().__init__(
            f"index {directory} changed while this writer worked: it read version {expected or '(none)'}, "
            f"the folder now holds {found or '(none)'}"
        )


class IndexLockTimeout(VectorIndexError):
    """The index folder's write lock stayed held by another writer for longer than the timeout."""
