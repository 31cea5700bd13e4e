"""The run lease of an embedding folder on object storage (s3://, gs://): one writer per prefix.

A local folder's run holds an flock that the kernel drops when its process dies (shards.py). An object
store has no such lock, so a run there writes a lease object PREFIX/.lock (JSON: run id, host, pid,
started, heartbeat) and keeps it fresh:

- acquire: a lease of another run whose heartbeat is younger than its timeout means that run is alive:
  refused (EmbedError naming the prefix, the holder's host and run id and when it last beat). An older
  one is a dead run's leftover: taken over, with a warning. The lease is then written and read back.
- heartbeat: a daemon thread rewrites the lease every `interval` seconds (well below the timeout), after
  reading it to see that it is still this run's; it stops when it is not.
- check (before every write to the prefix): the lease is read again and must still be this run's, and
  this run must have renewed it within the timeout. A run that was presumed dead (a stalled process, a
  network partition) but was only slow thus stops with an EmbedError instead of writing rows the run
  that took over does not know of: that would break "each id has at most one row over all shards".
- release: the heartbeat stops and the lease is deleted, if it is still this run's.

This is not atomic. Each step is a read followed by a write, and pyarrow's filesystems expose no
conditional PUT (S3's If-None-Match / If-Match, GCS's generation preconditions), so two runs started
within one round trip of each other can both find the prefix free and both proceed (the read-back after
acquiring catches the case where one PUT lands after the other's read-back, and a later check stops the
run whose lease was overwritten, but a shard written between the two can still duplicate ids). The rule
therefore stays one writer per prefix, as for indexes (index/object_versions.py): start one embed run
per --out prefix at a time. The lease guards against the common mistakes: a second run started later
while one is running, and the leftover of a run that died. Ages are compared on wall clocks of
different hosts; keep their skew well below the timeout (NTP does).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from datetime import datetime, timezone

from voxsearch.common.storage import ObjectPath
from voxsearch.embed.config import EmbedError

log = logging.getLogger(__name__)

# A lease not renewed for this long belongs to a dead run and may be taken over.
LEASE_TIMEOUT_S = 600.0
# The holder renews its lease this often (a tenth of the timeout by default).
HEARTBEAT_FRACTION = 0.1


def new_run_id() -> str:
    """A run's name: its start time (UTC) and a random suffix, as in its shard names."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + os.urandom(3).hex()


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class RunLease:
    """The lease object `obj` held by this run (see the module docstring)."""

    def __init__(self, obj: ObjectPath, run_id: str, timeout: float = LEASE_TIMEOUT_S,
                 interval: float | None = None):
        if timeout <= 0:
            raise ValueError(f"lease timeout must be positive, got {timeout}")
        self.obj = obj
        self.run_id = run_id
        self.timeout = float(timeout)
        self.interval = float(interval) if interval is not None else self.timeout * HEARTBEAT_FRACTION
        if not 0 < self.interval < self.timeout:
            raise ValueError(f"heartbeat interval must be in (0, {self.timeout:g}) s, got {self.interval:g}")
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.started = time.time()
        self.beats = 0  # successful renewals
        self._renewed = time.monotonic()  # last time this run wrote its lease
        self._lost: str | None = None  # why the heartbeat stopped: the lease is no longer ours
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the object ------------------------------------------------------------------------------------
    def _body(self) -> dict:
        return {"run_id": self.run_id, "host": self.host, "pid": self.pid, "started": self.started,
                "heartbeat": time.time(), "timeout_s": self.timeout}

    def _write(self) -> None:
        before = time.monotonic()
        self.obj.write_text(json.dumps(self._body(), sort_keys=True))
        self._renewed = before  # counted from before the PUT: conservative

    def read(self, attempts: int = 3) -> dict | None:
        """The lease as stored, or None where there is none. An object that is not a lease (damaged, or a
        local lock file copied there) counts as one of an unknown run last renewed when it was written.
        Such a read is tried again first: a store whose overwrites are not atomic (some S3 gateways and
        test servers) can hand back a half-written lease while its holder renews it."""
        for attempt in range(attempts):
            try:
                text = self.obj.read_text(errors="replace")
            except FileNotFoundError:
                return None
            try:
                lease = json.loads(text)
                if isinstance(lease, dict) and isinstance(lease.get("heartbeat"), (int, float)):
                    return lease
            except ValueError:
                pass
            if attempt + 1 < attempts:
                time.sleep(0.05 * (attempt + 1))
        try:
            _, mtime_ns = self.obj.stat()
        except FileNotFoundError:
            return None
        return {"run_id": "?", "host": "?", "pid": "?", "heartbeat": mtime_ns / 1e9 if mtime_ns else 0.0,
                "unreadable": text[:80]}

    def _ours(self, lease: dict | None) -> bool:
        return bool(lease) and lease.get("run_id") == self.run_id and lease.get("pid") == self.pid

    @staticmethod
    def describe(lease: dict) -> str:
        age = time.time() - float(lease.get("heartbeat", 0))
        return (f"run {lease.get('run_id', '?')} on host {lease.get('host', '?')} (pid {lease.get('pid', '?')}), "
                f"last heartbeat {_when(lease.get('heartbeat'))} ({age:.0f} s ago)")

    # -- life cycle ------------------------------------------------------------------------------------
    def acquire(self, root) -> None:
        found = self.read()
        if found is not None and not self._ours(found):
            timeout = float(found.get("timeout_s") or self.timeout)  # the holder's promise, where it made one
            age = time.time() - float(found["heartbeat"])
            if age < timeout:
                raise EmbedError(
                    f"{root} is being written by another embed run: {self.describe(found)}; its lease "
                    f"{self.obj} expires {timeout:.0f} s after its last heartbeat. One embed run per prefix "
                    f"at a time: wait for it to finish, or, if it is dead, for its lease to expire")
            log.warning("%s: the lease of %s is stale (older than %.0f s): its run is gone; taking over",
                        self.obj, self.describe(found), timeout)
        self._write()
        back = self.read()
        if not self._ours(back):  # another run wrote its lease between our read and our PUT
            raise EmbedError(f"{root}: another embed run took the lease {self.obj} while this one started "
                             f"({self.describe(back) if back else 'then deleted it'}). One embed run per "
                             f"prefix at a time")
        self._thread = threading.Thread(target=self._beat, name=f"embed-lease-{self.run_id}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                found = self.read()
                if not self._ours(found):
                    self._lost = (f"taken over by {self.describe(found)}" if found
                                  else "deleted by someone else")
                    log.error("%s: this run's lease was %s; it will stop before its next write", self.obj, self._lost)
                    return
                self._write()
                self.beats += 1
            except Exception as e:  # a store hiccup: keep trying; check() stops the run if it lasts
                log.warning("cannot renew the run lease %s: %s", self.obj, e)

    def check(self) -> None:
        """Raise EmbedError unless this run still holds the lease; called before every write."""
        lapsed = time.monotonic() - self._renewed
        if lapsed >= self.timeout:
            raise EmbedError(f"{self.obj}: this run could not renew its lease for {lapsed:.0f} s (timeout "
                             f"{self.timeout:.0f} s), so another run may have taken the folder over; stopping "
                             "without writing. Rerun to embed the rest")
        if self._lost is None:
            try:
                found = self.read()
            except OSError as e:
                raise EmbedError(f"cannot check this run's lease {self.obj}: {e}") from e
            if self._ours(found):
                return
            self._lost = f"taken over by {self.describe(found)}" if found else "deleted by someone else"
        raise EmbedError(f"{self.obj}: this run's lease was {self._lost}, presumably because this run "
                         f"(run {self.run_id}, host {self.host}, pid {self.pid}) was thought dead; stopping "
                         "without writing, so no series gets two rows. Rerun once the other run is done")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        try:
            if self._ours(self.read()):
                self.obj.unlink(missing_ok=True)
        except OSError as e:  # it then expires after the timeout
            log.warning("cannot delete the run lease %s: %s", self.obj, e)
