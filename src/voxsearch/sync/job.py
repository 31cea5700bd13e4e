"""The standing job for new studies: keep catalog, embeddings and index in step with a source.

A round ingests what is new or changed in the source (a folder, or a PACS through a de-identified local
mirror), embeds it, adds it to the index the server searches (which picks up the new version without a
restart), and removes from all three what the source deleted. Every step is idempotent and derived
from the state on disk, so a round killed anywhere and run again ends with each series once.

A listing that lacks most of what is known is more often an emptied or restarted PACS, changed
permissions or an unmounted folder than a real mass deletion: a round deletes at most
`max_delete_share` of the known series, and never all of them, unless `allow_mass_delete` is set.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from voxsearch.common.runtime import RayConfig
from voxsearch.common.storage import ObjectPath, location

log = logging.getLogger(__name__)


@dataclass
class SyncConfig:
    source: str  # a folder or a DICOMweb base URL
    catalog: Path
    index: Path
    checkpoint: Path | ObjectPath  # s3:// and gs:// too (EmbedConfig.checkpoint)
    embeddings: Path | None = None  # default: beside the index, "<index>-embeddings"
    mirror: Path | None = None  # PACS sources: default "<catalog>-mirror"
    auth_file: Path | None = None  # DICOMweb credentials (else the environment)
    modality: str | None = None
    study_date_from: str | None = None
    study_date_to: str | None = None
    retries: int = 4
    deadline_s: float = 300.0
    ingest_engine: str = "ray"
    # Passed on to EmbedConfig (e.g. actor_cpus, read_cpus, batch_size): a sync sharing its cluster with
    # a server must leave the server's reserved CPUs free or its embedding tasks wait forever.
    embed_options: dict = field(default_factory=dict)
    # Above this share of the known series (or all of them) a round deletes nothing; see the module doc.
    max_delete_share: float = 0.2
    allow_mass_delete: bool = False
    progress: bool = True
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self):
        self.catalog, self.index, self.checkpoint = Path(self.catalog), Path(self.index), location(self.checkpoint)
        self.embeddings = Path(self.embeddings) if self.embeddings else self.index.with_name(self.index.name + "-embeddings")
        if self.mirror is None:
            from voxsearch.ingest.dicomweb import default_mirror_dir

            self.mirror = default_mirror_dir(self.catalog)
        self.mirror = Path(self.mirror)
        if not 0.0 <= self.max_delete_share <= 1.0:
            raise ValueError(f"max_delete_share must be between 0 and 1, got {self.max_delete_share}")

    @property
    def is_pacs(self) -> bool:
        from voxsearch.ingest.dicomweb import is_dicomweb_url

        return is_dicomweb_url(self.source)


@dataclass
class RoundReport:
    added: int = 0
    changed: int = 0
    deleted: int = 0
    deletions_refused: int = 0  # series the source lacks but that were kept: too many at once
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    index_size: int | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _catalog_ids(catalog: Path) -> dict[str, str]:
    """series_id -> source_path of the live catalog rows."""
    from voxsearch.ingest import read_catalog

    if not (catalog / "rows").is_dir():
        return {}
    table = read_catalog(catalog)
    if table.num_rows == 0:
        return {}
    return dict(zip(table.column("series_id").to_pylist(), table.column("source_path").to_pylist()))


def _gone_from_folder(catalog_rows: dict[str, str]) -> list[str]:
    return sorted(sid for sid, path in catalog_rows.items() if path and not Path(path).exists())


def _forget(cfg: SyncConfig, series_ids: list[str]) -> None:
    """Remove series from the embeddings (marked superseded, so the index drops them) and the catalog."""
    from voxsearch.embed.shards import EmbeddingStore
    from voxsearch.ingest.forget import forget_series

    store = EmbeddingStore(cfg.embeddings)
    if store.manifest() is not None:
        with store.locked():
            store.mark_superseded(series_ids)
            store.remove_ids(series_ids)
    forget_series(cfg.catalog, series_ids)


def _mass_delete(cfg: SyncConfig, gone: list[str], known: int) -> bool:
    """True when deleting `gone` out of `known` series needs allow_mass_delete."""
    return bool(gone) and not cfg.allow_mass_delete and (len(gone) >= known or len(gone) > cfg.max_delete_share * known)


def sync_round(cfg: SyncConfig) -> RoundReport:
    from voxsearch.embed import EmbedConfig, run_embedding
    from voxsearch.ingest import IngestConfig, run_ingest

    start = time.perf_counter()
    report = RoundReport()
    cfg.catalog.mkdir(parents=True, exist_ok=True)
    before = _catalog_ids(cfg.catalog)
    if cfg.is_pacs:
        from voxsearch.ingest.dicomweb import DicomWebConfig, PacsError, pull_for_catalog

        dw = DicomWebConfig(url=cfg.source, auth_file=cfg.auth_file, modality=cfg.modality,
                            study_date_from=cfg.study_date_from, study_date_to=cfg.study_date_to,
                            retries=cfg.retries, deadline_s=cfg.deadline_s)
        try:
            mirror, pulled = pull_for_catalog(dw, cfg.catalog, cfg.mirror, progress=cfg.progress)
        except PacsError as exc:
            # Nothing is known about the source this round; deleting on that basis would empty the index.
            report.failed, report.errors = 1, [str(exc)]
            report.seconds = round(time.perf_counter() - start, 3)
            log.error("sync round skipped: %s", exc)
            return report
        report.failed += len(pulled.errors)
        report.errors += [reason for _, reason in pulled.errors]
        gone = pulled.gone
        archive = mirror.series_dir
        archive.mkdir(parents=True, exist_ok=True)
    else:
        archive = Path(cfg.source)
        if not archive.is_dir():
            raise FileNotFoundError(f"sync source {archive} is neither a folder nor a DICOMweb URL")
        gone = _gone_from_folder(before)

    known = len(set(before) | set(gone) | (mirror.present() if cfg.is_pacs else set()))
    if _mass_delete(cfg, gone, known):
        why = "all of them" if len(gone) >= known else f"over the {cfg.max_delete_share:.0%} one round may delete"
        log.warning("sync: the source lacks %d of the %d known series (%s): deleting none of them this round; "
                    "if the source really deleted them, rerun with --allow-mass-delete", len(gone), known, why)
        report.deletions_refused = len(gone)
        gone = []

    if gone:
        _forget(cfg, gone)
        if cfg.is_pacs:
            mirror.drop(gone)
        report.deleted = len(gone)

    only = None
    if cfg.is_pacs:
        # The mirror knows what changed: read just that, plus anything mirrored but not yet catalogued (a
        # round killed after its fetch, or a series that failed to ingest last time).
        keys = set(pulled.changed) | (mirror.present() - set(before) - set(gone))
        only = tuple(archive / key for key in sorted(keys))
    if only != ():
        ingested = run_ingest(IngestConfig(archive=archive, out=cfg.catalog, engine=cfg.ingest_engine,
                                           ray_address=cfg.ray.address, progress=cfg.progress, only=only))
        report.failed += ingested.failed
        from voxsearch.ingest.catalog import read_all_rows

        rows = read_all_rows(cfg.catalog)
        this_run = {s for s, r in zip(rows.column("series_id").to_pylist(), rows.column("run_id").to_pylist())
                    if r == ingested.run_id} if rows.num_rows else set()
        after = set(_catalog_ids(cfg.catalog))
        report.added = len({s for s in this_run if s not in before and s in after})
        report.changed = len({s for s in this_run if s in before})

    embedded = run_embedding(EmbedConfig(catalog=cfg.catalog, checkpoint=cfg.checkpoint, out=cfg.embeddings,
                                         index=cfg.index, progress=cfg.progress, ray=cfg.ray, **cfg.embed_options))
    report.failed += embedded.failed
    if embedded.index:
        report.index_size = embedded.index.get("size")
    report.seconds = round(time.perf_counter() - start, 3)
    log.info("sync round: %s", {k: v for k, v in report.to_dict().items() if k != "errors"})
    return report


def sync_forever(cfg: SyncConfig, every: float, rounds: int | None = None, on_round=None) -> None:
    """A round every `every` seconds (measured start to start); `rounds` bounds it for tests and demos."""
    done = 0
    while rounds is None or done < rounds:
        started = time.monotonic()
        try:
            report = sync_round(cfg)
        except Exception as exc:  # a standing job outlives one bad round; the next one retries
            log.exception("sync round failed: %s", exc)
            report = RoundReport(failed=1, errors=[f"{type(exc).__name__}: {exc}"])
        if on_round:
            on_round(report)
        done += 1
        if rounds is not None and done >= rounds:
            break
        time.sleep(max(0.0, every - (time.monotonic() - started)))
