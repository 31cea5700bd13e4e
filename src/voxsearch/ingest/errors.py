"""The one exception type the ingest component raises for bad input."""

from __future__ import annotations


class IngestError(ValueError):
    """Bad or unsupported input; the message names the input and says what is wrong.

    `stage` tells where it failed (read, validate, preprocess, report, ...), for the errors table.
    """

    def __init__(self, message: str, stage: str = "read"):
        super().__init__(message)
        self.stage = stage
