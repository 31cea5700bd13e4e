"""What every component shares and none owns: where Ray runs, the version, durable file writes.

This package sits below ingest, encoders, index, embed, serve and training; it imports none of them.
"""

__version__ = "0.1.0"
