"""The serving configuration: one typed dataclass tree, loadable from one JSON or YAML file.

Every field has a default sized for a 2-core laptop; a cluster config overrides replicas and resources.
Unknown keys are an error, so a typo in a config file never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from voxsearch.common.storage import is_uri, location


def is_loopback(host: str) -> bool:
    """Whether an address to bind (or a host name in a request) reaches only this machine."""
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ServeConfigError(ValueError):
    """A config file or value that cannot be served."""


@dataclass
class DeploymentOptions:
    """Replicas and resources of one Ray Serve deployment."""

    num_replicas: int = 1
    # Fractional CPUs: five deployments plus the ingress must fit on 2 cores next to Ray Data jobs.
    num_cpus: float = 0.2
    num_gpus: float = 0.0
    max_ongoing_requests: int = 16
    # Threads torch may use inside the replica; 0 leaves torch's default.
    torch_threads: int = 1
    # Optional Serve autoscaling_config (min_replicas, max_replicas, target_ongoing_requests, ...).
    autoscaling: dict | None = None

    def serve_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "max_ongoing_requests": self.max_ongoing_requests,
        }
        if self.autoscaling:
            options["autoscaling_config"] = dict(self.autoscaling)
        else:
            options["num_replicas"] = self.num_replicas
        return options


@dataclass
class Deployments:
    ingress: DeploymentOptions = field(default_factory=lambda: DeploymentOptions(max_ongoing_requests=64))
    text_encoder: DeploymentOptions = field(default_factory=DeploymentOptions)
    image_encoder: DeploymentOptions = field(default_factory=DeploymentOptions)
    searcher: DeploymentOptions = field(default_factory=lambda: DeploymentOptions(max_ongoing_requests=64))
    studies: DeploymentOptions = field(default_factory=lambda: DeploymentOptions(max_ongoing_requests=32))
    reporter: DeploymentOptions = field(default_factory=lambda: DeploymentOptions(max_ongoing_requests=4))


@dataclass
class BatchOptions:
    """Request batching of the image and text encoders (@serve.batch)."""

    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.01


@dataclass
class Limits:
    """What an upload may be; anything beyond is refused with a 4xx before it costs memory."""

    max_upload_bytes: int = 512 * 1024 * 1024
    # ~512 x 512 x 1500 voxels (1.6 GB as float32 while decoding); the model input is much smaller.
    max_voxels: int = 400_000_000
    max_zip_entries: int = 5000
    max_zip_uncompressed_bytes: int = 4 * 1024**3
    # A ratio above this per entry is treated as a zip bomb (DICOM compresses ~2-5x; bombs ~1000x).
    max_zip_ratio: float = 200.0
    # Voxel data a header declares (voxels x bytes per voxel; DICOM: rows x columns x frames x bits): a
    # small .nii.gz can declare gigabytes. float32 fits at max_voxels; float64 at half of it.
    max_decoded_bytes: int = 1600 * 1024**2
    # Uploads decoded at once per ingress replica (each holds up to ~max_voxels x 4 bytes in memory); one
    # more waits up to decode_wait_s for a slot, then is answered 503 with Retry-After.
    max_concurrent_decodes: int = 2
    decode_wait_s: float = 10.0
    # Any request body other than an upload (JSON searches, id-only forms).
    max_body_bytes: int = 1024**2
    max_query_chars: int = 1000
    max_k: int = 100
    max_report_chars: int = 20_000


@dataclass
class ServeConfig:
    # Inputs (filled by the command line when not in the file).
    index: str | None = None
    checkpoint: str | None = None
    catalog: str | None = None
    # Optional report model directory (voxsearch.reports.model) or its s3:// / gs:// URI (each replica
    # fetches it into the checkpoint cache); None: retrieval-based drafts.
    report_model: str | None = None
    # Where studies added through /embed are kept (de-identified volumes + their catalog rows).
    data_dir: str | None = None
    # Where uploads are unpacked while processed (deleted right after); None: the system temp folder.
    upload_dir: str | None = None

    host: str = "127.0.0.1"
    port: int = 8000
    app_name: str = "voxsearch"
    # None: keys are required exactly when the HTTP proxy binds a non-loopback address (see bound_to).
    require_api_key: bool | None = None
    api_keys: list[str] = field(default_factory=list)
    # A file with one key per line (keeps keys out of the config file and the process list).
    api_keys_file: str | None = None

    deployments: Deployments = field(default_factory=Deployments)
    batching: BatchOptions = field(default_factory=BatchOptions)
    limits: Limits = field(default_factory=Limits)

    # How often searcher replicas look for a new index version on disk.
    index_poll_s: float = 2.0
    # How many reports of nearby training studies a retrieval-based draft reads.
    draft_neighbours: int = 5
    # How strongly a query's named findings steer text search through the model's finding head
    # (ClipModel.encode_query); None: the weight the checkpoint was calibrated with; 0 searches by the
    # text embedding alone.
    finding_query_weight: float | None = None
    excerpt_chars: int = 240
    # Volumes kept in memory for slice rendering, per study-store replica.
    volume_cache: int = 8
    # Run the index searcher and the study store inside each ingress replica instead of as deployments
    # of their own: a call between replicas costs milliseconds of CPU, more than the search itself, so
    # this serves several times the requests per core. Turn it off to scale them separately on a
    # cluster (deployments.searcher and deployments.studies then apply).
    colocate_data: bool = True
    # Ray Serve's per-request access log lines (in its log files); off, each request costs less CPU.
    access_log: bool = False

    def keys_required(self) -> bool:
        if self.require_api_key is not None:
            return self.require_api_key
        return not is_loopback(self.host)

    def bound_to(self, host: str, port: int) -> ServeConfig:
        """This config as served by a proxy that really listens on host:port, checked for API keys again.

        Serve keeps the HTTP options of an instance already running in the cluster, so the proxy may
        listen somewhere else than `host` says (0.0.0.0 instead of loopback): keys follow the real address.
        """
        bound = dataclasses.replace(self, host=host, port=int(port))
        if bound.keys_required() and not bound.resolved_api_keys():
            if bound.host == self.host:
                raise self._keys_missing()
            raise ServeConfigError(
                f"Serve's HTTP proxy in this Ray cluster already listens on {host}:{port} (not loopback), "
                f"although this config asks for {self.host}:{self.port}; serving there without API keys would "
                "expose the archive: set api_keys_file or VOXSEARCH_API_KEYS, or shut the running Serve "
                "instance down (serve shutdown) so that it starts again on the configured host"
            )
        return bound

    def _keys_missing(self) -> ServeConfigError:
        return ServeConfigError(
            f"serving on {self.host} (not loopback) requires API keys: set api_keys_file in the config, "
            "or VOXSEARCH_API_KEYS, or require_api_key: false if a proxy in front authenticates"
        )

    def resolved_api_keys(self) -> list[str]:
        keys = [k.strip() for k in self.api_keys if k.strip()]
        env = os.environ.get("VOXSEARCH_API_KEYS", "")
        keys += [k.strip() for k in env.split(",") if k.strip()]
        if self.api_keys_file:
            path = Path(self.api_keys_file)
            if not path.is_file():
                raise ServeConfigError(f"api_keys_file {path} does not exist")
            keys += [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        return keys

    def validate(self) -> None:
        for name in ("index", "checkpoint", "catalog"):
            value = getattr(self, name)
            if not value:
                raise ServeConfigError(f"serve config: '{name}' is required")
            if not _exists(name, value):
                raise ServeConfigError(f"serve config: {name} path {location(value)} does not exist")
        # Studies added through /embed are kept as files under a file lock (serve/added_studies.py), by
        # default in a folder beside the index.
        if is_uri(self.data_dir):
            raise ServeConfigError(f"serve config: data_dir {location(self.data_dir)} must be a local or shared "
                                   "folder: studies added through /embed are kept there")
        if is_uri(self.index) and not self.data_dir:
            raise ServeConfigError(f"serve config: the index {location(self.index)} is on object storage, so data_dir "
                                   "is required: a local or shared folder for studies added through /embed")
        if self.report_model and not (_exists("report_model", self.report_model) if is_uri(self.report_model)
                                      else Path(self.report_model).is_dir()):
            # An s3:// or gs:// URI: each replica fetches its own copy into the checkpoint cache.
            raise ServeConfigError(f"serve config: report_model directory {location(self.report_model)} "
                                   "does not exist")
        if not (0 < self.port < 65536):
            raise ServeConfigError(f"serve config: port {self.port} is out of range")
        if self.limits.max_concurrent_decodes < 1:
            raise ServeConfigError("serve config: limits.max_concurrent_decodes must be at least 1")
        if self.finding_query_weight is not None and not self.finding_query_weight >= 0:
            raise ServeConfigError("serve config: finding_query_weight must be a number >= 0 (or absent: the "
                                   "checkpoint's own)")
        if self.limits.decode_wait_s < 0:
            raise ServeConfigError("serve config: limits.decode_wait_s must not be negative")
        if self.keys_required() and not self.resolved_api_keys():
            raise self._keys_missing()
        if any(len(k) < 16 for k in self.resolved_api_keys()):
            raise ServeConfigError("serve config: every API key must be at least 16 characters")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _exists(name: str, value: str) -> bool:
    """The index, checkpoint and catalog may each be an s3:// or gs:// URI (each replica reads its own
    copy): checked by one request to the store."""
    try:
        return location(value).exists()
    except (OSError, ValueError) as exc:  # names the URI, never a key (storage.ObjectPath)
        raise ServeConfigError(f"serve config: {name} {exc}") from None


def _build(cls, data: Any, where: str):
    if not dataclasses.is_dataclass(cls):
        return data
    if not isinstance(data, dict):
        raise ServeConfigError(f"serve config: {where or 'top level'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ServeConfigError(
            f"serve config: unknown key(s) {unknown} in {where or 'top level'}; known: {sorted(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        sub = _NESTED.get((cls, name))
        kwargs[name] = _build(sub, value, f"{where}.{name}".lstrip(".")) if sub else value
    return cls(**kwargs)


_NESTED = {
    (ServeConfig, "deployments"): Deployments,
    (ServeConfig, "batching"): BatchOptions,
    (ServeConfig, "limits"): Limits,
    **{(Deployments, f.name): DeploymentOptions for f in dataclasses.fields(Deployments)},
}


def serve_config_from_dict(data: dict) -> ServeConfig:
    return _build(ServeConfig, data, "")


def load_serve_config(path: str | os.PathLike) -> ServeConfig:
    """Read a ServeConfig from a .json, .yaml or .yml file."""
    path = Path(path)
    if not path.is_file():
        raise ServeConfigError(f"serve config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - both parsers raise their own types
        raise ServeConfigError(f"serve config file {path} is not valid {path.suffix.lstrip('.')}: {exc}") from exc
    return serve_config_from_dict(data)
