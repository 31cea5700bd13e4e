"""voxsearch: search archives of 3D medical scans by text and by example scan."""

__version__ = "0.1.0"
