"""voxsearch: search archives of 3D medical scans by text and by example scan."""

from voxsearch.common import __version__

__all__ = ["__version__"]
