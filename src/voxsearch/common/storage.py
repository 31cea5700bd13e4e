"""Folders that may live in object storage: `location("s3://bucket/prefix")` is an ObjectPath,
anything else a local Path.

An object store has no rename and no locks, but a PUT appears whole or not at all. So an object is
always written from bytes already in memory or from a finished local file, never as a stream a crash
could cut short, and whoever needs a set of objects to appear at once publishes a small pointer object
last (index/versions.py).

S3 (and MinIO or any S3-compatible server): the endpoint comes from AWS_ENDPOINT_URL_S3 or
AWS_ENDPOINT_URL when set, credentials and region from the usual AWS chain (AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_REGION or AWS_DEFAULT_REGION, ~/.aws, instance roles).
GCS (gs://): Google's application default credentials; when STORAGE_EMULATOR_HOST is set (a GCS
emulator, e.g. http://127.0.0.1:9023, http unless the value says https) that endpoint, anonymously.
Errors name the URI, never a credential: URI query strings (pyarrow accepts keys there) are left out of
every message.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import io
import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from voxsearch.common.durable import atomic_write_json, atomic_write_parquet

_URI_RE = re.compile(r"^(s3|gs|gcs)://", re.IGNORECASE)
_CHUNK = 8 << 20


def is_uri(value) -> bool:
    return isinstance(value, (str, ObjectPath)) and bool(_URI_RE.match(str(value)))


@functools.lru_cache(maxsize=16)
def _filesystem(scheme: str, bucket: str, query: str, endpoint: str) -> pafs.FileSystem:
    """One client per bucket and endpoint (from_uri looks up the bucket's region over the network)."""
    if scheme == "s3" and endpoint and not query:
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        return pafs.S3FileSystem(endpoint_override=parts.netloc, scheme=parts.scheme, region=region)
    if scheme == "gs" and endpoint and not query:
        parts = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
        return pafs.GcsFileSystem(anonymous=True, scheme=parts.scheme, endpoint_override=parts.netloc)
    return pafs.FileSystem.from_uri(f"{scheme}://{bucket}" + (f"?{query}" if query else ""))[0]


@dataclass(frozen=True)
class ObjectPath:
    """An object, or a prefix of objects, in a bucket: the part of pathlib.Path the folders here need."""

    scheme: str
    path: str  # "bucket/key/..." as pyarrow names it, no trailing slash
    query: str = field(default="", repr=False)  # may hold keys: never shown

    @classmethod
    def parse(cls, uri: str) -> "ObjectPath":
        parts = urlsplit(uri)
        scheme = "gs" if parts.scheme.lower() == "gcs" else parts.scheme.lower()
        if not parts.netloc:
            raise ValueError(f"{scheme}:// location without a bucket name: {uri.split('?')[0]}")
        return cls(scheme, f"{parts.netloc}/{parts.path.strip('/')}".rstrip("/"), parts.query)

    @property
    def uri(self) -> str:
        return f"{self.scheme}://{self.path}"

    def __str__(self) -> str:
        return self.uri

    def __truediv__(self, name: str) -> "ObjectPath":
        return ObjectPath(self.scheme, f"{self.path}/{str(name).strip('/')}", self.query)

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def parent(self) -> "ObjectPath":
        return ObjectPath(self.scheme, self.path.rsplit("/", 1)[0], self.query) if "/" in self.path else self

    @property
    def fs(self) -> pafs.FileSystem:
        bucket = self.path.split("/", 1)[0]
        if self.scheme == "s3":
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
        else:
            endpoint = os.environ.get("STORAGE_EMULATOR_HOST") or ""
        try:
            return _filesystem(self.scheme, bucket, self.query, endpoint)
        except (OSError, ValueError) as exc:
            # pyarrow may quote the URI it was given, query (and any keys in it) included.
            detail = "check the options in its URI" if self.query else str(exc)
            raise OSError(f"cannot open {self.scheme}://{bucket}: {detail}") from None

    @contextmanager
    def _named(self, action: str) -> Iterator[None]:
        """pyarrow's errors name the bucket path without the scheme; ours name the URI."""
        try:
            yield
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.uri}: no such object") from None
        except OSError as exc:
            raise OSError(f"cannot {action} {self.uri}: {exc}") from None

    # -- single objects ------------------------------------------------------------------------------
    def read_bytes(self) -> bytes:
        with self._named("read"), self.fs.open_input_stream(self.path) as stream:
            return stream.read()

    def read_text(self, errors: str = "strict") -> str:
        return self.read_bytes().decode("utf-8", errors=errors)

    def write_bytes(self, data: bytes) -> None:
        """Upload the whole object (replacing any): readers see the old object or all of `data`, as the
        store makes it visible only once the upload completes."""
        with self._named("write"), self.fs.open_output_stream(self.path) as stream:
            stream.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def upload(self, local: Path) -> None:
        """Copy a finished local file to this object. A cut-off upload may leave a short object, so
        uploads are only ever reached through a pointer written after they all succeeded."""
        with self._named("write"), open(local, "rb") as src, self.fs.open_output_stream(self.path) as stream:
            while chunk := src.read(_CHUNK):
                stream.write(chunk)

    def download(self, local: Path) -> tuple[int, str]:
        """Copy this object to a local file; returns its (size, sha256), computed on the way."""
        digest, size = hashlib.sha256(), 0
        with self._named("read"), self.fs.open_input_stream(self.path) as stream, open(local, "wb") as dst:
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
                dst.write(chunk)
        return size, digest.hexdigest()

    def is_file(self) -> bool:
        with self._named("stat"):
            return self.fs.get_file_info(self.path).type == pafs.FileType.File

    def stat(self) -> tuple[int, int | None]:
        """(size, modification time in ns) of this object."""
        with self._named("stat"):
            info = self.fs.get_file_info(self.path)
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(f"{self.uri}: no such object")
        return info.size, info.mtime_ns

    def is_dir(self) -> bool:
        """Objects exist under this name as a prefix."""
        with self._named("stat"):
            return self.fs.get_file_info(self.path).type == pafs.FileType.Directory

    def exists(self) -> bool:
        """An object of this name, or any object under it as a prefix."""
        with self._named("stat"):
            return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            with self._named("delete"):
                self.fs.delete_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    # -- prefixes ------------------------------------------------------------------------------------
    def iterdir(self) -> list["ObjectPath"]:
        """Objects and sub-prefixes directly under this prefix (none when it holds nothing)."""
        with self._named("list"):
            if self.scheme == "gs":
                # pyarrow's GCS listing shows a sub-prefix only where a "folder" marker object names it,
                # and nothing here writes those: list every object below, keep the first name of each.
                infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True, allow_not_found=True))
                names = {info.path[len(self.path) + 1:].split("/", 1)[0] for info in infos}
            else:
                infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
                names = {info.base_name for info in infos}
        return sorted(self / name for name in names if name)

    def glob(self, pattern: str) -> list["ObjectPath"]:
        """Objects and sub-prefixes directly under this prefix whose name matches `pattern` (no "/")."""
        return [p for p in self.iterdir() if fnmatch.fnmatchcase(p.name, pattern)]

    def rglob_files(self) -> list["ObjectPath"]:
        """Every object under this prefix, at any depth."""
        return [obj for obj, _, _ in self.rglob_stats()]

    def rglob_stats(self) -> list[tuple["ObjectPath", int, int | None]]:
        """(object, size, modification time in ns) of every object under this prefix, at any depth."""
        with self._named("list"):
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True, allow_not_found=True))
        return sorted((ObjectPath(self.scheme, info.path, self.query), info.size, info.mtime_ns)
                      for info in infos if info.type == pafs.FileType.File)

    def delete_tree(self) -> None:
        """Delete every object under this prefix (and the empty "folder" markers pyarrow leaves when a
        prefix's last object goes); a prefix already gone is no error."""
        try:
            with self._named("delete"):
                if self.scheme != "gs":
                    self.fs.delete_dir(self.path)
                    return
                # pyarrow's GCS delete_dir refuses a prefix that holds nothing; a "folder" marker object
                # (others' tools write them) outlives delete_dir_contents.
                self.fs.delete_dir_contents(self.path, missing_dir_ok=True)
                if self.fs.get_file_info(self.path).type == pafs.FileType.Directory:
                    self.fs.delete_dir(self.path)
        except FileNotFoundError:
            pass

    def __lt__(self, other: "ObjectPath") -> bool:
        return self.path < other.path


def location(value: "str | os.PathLike | ObjectPath") -> "Path | ObjectPath":
    """A folder argument as a local Path, or as an ObjectPath for s3://, gs:// and gcs:// URIs."""
    if isinstance(value, ObjectPath):
        return value
    if is_uri(value):
        return ObjectPath.parse(value)
    return Path(value)


def write_json(target: "Path | ObjectPath", obj, **dumps_kwargs) -> None:
    """As durable.atomic_write_json (indent 2 unless told), for a file or an object."""
    if isinstance(target, ObjectPath):
        dumps_kwargs.setdefault("indent", 2)
        target.write_text(json.dumps(obj, **dumps_kwargs))
    else:
        atomic_write_json(target, obj, **dumps_kwargs)


def write_parquet(target: "Path | ObjectPath", table, **write_options) -> None:
    """`table` as a Parquet file or object that appears whole or not at all."""
    if isinstance(target, ObjectPath):
        import pyarrow.parquet as pq

        # Into memory first: closing an upload stream after a failed write would publish a cut file.
        buffer = io.BytesIO()
        pq.write_table(table, buffer, **write_options)
        target.write_bytes(buffer.getvalue())
    else:
        atomic_write_parquet(target, table, **write_options)


def read_parquet(source: "Path | ObjectPath", **read_options):
    """A Parquet file or object as a pyarrow Table (options as pyarrow.parquet.read_table's)."""
    import pyarrow.parquet as pq

    if isinstance(source, ObjectPath):
        with source._named("read"):
            return pq.read_table(source.path, filesystem=source.fs, **read_options)
    return pq.read_table(source, **read_options)
