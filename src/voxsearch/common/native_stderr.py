"""Keep known-harmless lines of Ray's C++ core off the terminal without hiding its real errors.

The driver's C++ core worker writes its log lines straight to file descriptor 2, past Python's logging,
and no Ray setting hides one line without hiding every error of the core. One such line comes with every
Ray Data actor pool (ray-project/ray#57733): "core_worker.cc:NNNN: Actor with class name:
'MapWorker(...)' ... has constructor arguments in the object store and max_restarts > 0". Ray Data
passes the actors references that it keeps alive for the pool's life, so the restart hazard the line
warns of (ray-project/ray#53727) does not arise; it reads like a failure to a user all the same.

`filter_native_stderr` puts a pipe on descriptor 2 and a thread that forwards every line but those to the
real stderr. Python's own output (sys.stderr: logging, progress bars, tracebacks) is rebound to the real
stderr directly, so progress bars still redraw in place and nothing Python prints waits on the thread.
"""

from __future__ import annotations

import atexit
import io
import os
import re
import select
import sys
import threading

HARMLESS = (
    re.compile(rb"core_worker\.cc:\d+: Actor with class name: 'MapWorker\(.*has constructor arguments in the "
               rb"object store and max_restarts > 0"),
)
_IDLE_FLUSH_S = 0.2  # a line the C++ side left without its newline is shown after this long
_MAX_LINE = 1 << 16

_installed = False


def filter_native_stderr(harmless=HARMLESS) -> None:
    """Install the filter once per process (the command line calls it when not --verbose)."""
    global _installed
    if _installed:
        return
    try:
        real = os.dup(2)
    except OSError:
        return  # no stderr at all: nothing to filter
    _installed = True
    read_end, write_end = os.pipe()
    sys.stderr.flush()
    os.dup2(write_end, 2)
    os.close(write_end)
    sys.stderr = io.TextIOWrapper(io.FileIO(real, "w", closefd=False), encoding=sys.stderr.encoding or "utf-8",
                                  errors="backslashreplace", line_buffering=True, write_through=True)
    stop = threading.Event()
    thread = threading.Thread(target=_forward, args=(read_end, real, harmless, stop), name="voxsearch-stderr",
                              daemon=True)
    thread.start()

    def restore() -> None:
        # Later writes to descriptor 2 (the interpreter's last words) go straight out; what is still in
        # the pipe is forwarded before the process ends.
        os.dup2(real, 2)
        stop.set()
        thread.join(timeout=1.0)

    atexit.register(restore)


def _forward(read_end: int, real: int, harmless, stop: threading.Event) -> None:
    pending = b""
    while True:
        ready, _, _ = select.select([read_end], [], [], _IDLE_FLUSH_S)
        if not ready:
            if pending:
                _write(real, pending, harmless)
                pending = b""
            if stop.is_set():
                return
            continue
        chunk = os.read(read_end, 65536)
        if not chunk:  # every writer closed the pipe
            _write(real, pending, harmless)
            return
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            _write(real, line + b"\n", harmless)
        if len(pending) > _MAX_LINE:
            _write(real, pending, harmless)
            pending = b""


def _write(real: int, data: bytes, harmless) -> None:
    if not data or any(p.search(data) for p in harmless):
        return
    try:
        os.write(real, data)
    except OSError:
        pass  # the terminal went away; nothing left to tell
