"""voxsearch.embed: bulk embedding of a catalog on Ray Data into Parquet shards, then into an index.

Resumable and exactly-once: every catalog row ends as one embedding row or one error row, and a rerun
(after a crash or on a grown catalog) embeds only what is missing or changed.
"""

from voxsearch.embed.config import EmbedConfig, EmbedError, EmbedSummary
from voxsearch.embed.runner import run_embedding

__all__ = ["EmbedConfig", "EmbedError", "EmbedSummary", "run_embedding"]
