"""voxsearch.sync: keep a catalog, its embeddings and an index in step with a source (a DICOMweb PACS
or a folder), round after round: pull, ingest, embed, index; delete what the source no longer lists."""

from voxsearch.sync.job import RoundReport, SyncConfig, sync_forever, sync_round

__all__ = ["RoundReport", "SyncConfig", "sync_forever", "sync_round"]
