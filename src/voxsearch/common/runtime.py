"""Where Ray runs: an in-process local Ray by default, or a cluster given by address or RAY_ADDRESS.

The command line also decides here what Ray may print (`show_ray_logs`), makes SIGTERM stop a
command the way Ctrl-C does (`sigterm_as_interrupt`), and ends every process a local Ray started
(`shutdown_ray`).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class RayConfig:
    # None: RAY_ADDRESS if set, else a local Ray started in this process.
    address: str | None = None
    num_cpus: int | None = None
    # A small object store keeps a laptop-sized local Ray light (~0.7 GB instead of ~1.6 GB).
    object_store_memory: int | None = 500_000_000
    include_dashboard: bool = False


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt, so that both stop a command the same way."""


# None until the command line decides (library callers keep Ray's output as it was); then whether
# Ray's own logs reach the terminal.
_ray_logs: bool | None = None
_sigterm_interrupts = False
# A local Ray's processes as ray.init left them: its agents are no longer this process's descendants
# once its raylet is gone, and they do not always follow it.
_local_processes: list = []


def show_ray_logs(show: bool) -> None:
    """Whether Ray's own logs reach this terminal (the command line's --verbose). Without them Ray
    still reports its errors here, and its processes keep their log files (/tmp/ray/session_*/logs)."""
    global _ray_logs
    _ray_logs = show
    if not show:
        # Read by Ray Data when it is imported, whenever that is, here and in a local Ray's workers.
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


@contextmanager
def sigterm_as_interrupt():
    """Within it SIGTERM raises `Terminated` (a KeyboardInterrupt) in the main thread, so that it stops
    a command through the same `except`/`finally` blocks as Ctrl-C. ray.init replaces SIGTERM's
    handler (Ray's exits at once, past the commands' Ctrl-C handling, and its C++ core prints a stack
    dump first), so init_ray puts this one back."""
    global _sigterm_interrupts
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    _sigterm_interrupts = True
    try:
        yield
    finally:
        _sigterm_interrupts = False
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _raise_terminated(signum, frame):
    raise Terminated()


def ray_initialized() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def init_ray(config: RayConfig | None = None):
    """Connect to (or start) Ray once per process and return the `ray` module."""
    import ray

    _init(ray, config)
    _quiet_ray_loggers()
    if _sigterm_interrupts and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)
    return ray


def init_ray_while(work: Callable[[], T], config: RayConfig | None = None) -> T:
    """init_ray while `work`, which needs no Ray (finding the inputs, generating an archive), runs in
    another thread: a local Ray takes seconds to start, half a minute on two cores. Returns what
    `work` returned and raises what it raised. Ray starts in this thread, not the other: the
    processes ray.init starts are killed when the thread that started them ends (PR_SET_PDEATHSIG)."""
    if ray_initialized():
        return work()
    done: Future = Future()

    def run() -> None:
        try:
            done.set_result(work())
        except BaseException as exc:  # noqa: BLE001 - raised again in the calling thread
            done.set_exception(exc)

    # A daemon: Ctrl-C while Ray starts must not wait for the work to finish.
    threading.Thread(target=run, name="voxsearch-while-ray-starts", daemon=True).start()
    init_ray(config)
    return done.result()


def _quiet_ray_loggers() -> None:
    if _ray_logs is False:
        # Importing ray (and ray.serve) sets these loggers' levels, so this runs again after imports.
        for name in ("ray", "ray.serve"):
            logging.getLogger(name).setLevel(logging.ERROR)


def _init(ray, config: RayConfig | None) -> None:
    if ray.is_initialized():
        return
    config = config or RayConfig()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = config.address or os.environ.get("RAY_ADDRESS")
    _quiet_ray_loggers()  # ray.init warns before it sets the level it is given
    if _ray_logs is None:
        output = {"log_to_driver": False, "configure_logging": bool(address)}
    else:
        output = {"log_to_driver": _ray_logs, "configure_logging": True,
                  "logging_level": logging.INFO if _ray_logs else logging.ERROR}
    if address:
        log.info("connecting to Ray cluster at %s", address)
        ray.init(address=address, **output)
        return
    log.info("starting a local Ray")
    ray.init(
        # "local": a new in-process cluster even when a `ray start` cluster runs on this machine.
        address="local",
        num_cpus=config.num_cpus,
        include_dashboard=config.include_dashboard,
        object_store_memory=config.object_store_memory,
        **output,
    )
    _local_processes[:] = _processes_of_this_ray(ray)


def _processes_of_this_ray(ray) -> list:
    """This process's children that belong to the Ray it just started (their command lines name its
    session), not other children the process has (a test's server, a PACS it runs)."""
    import psutil

    session = Path(ray._private.worker._global_node.get_session_dir_path()).name
    mine = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if any(session in part for part in proc.cmdline()):
                mine.append(proc)
        except psutil.Error:
            pass
    return mine


def shutdown_ray(grace_s: float = 1.0) -> None:
    """End this process's Ray: disconnect from a cluster (Ray ends this driver's tasks and actors
    there), or stop the local Ray with every process it started. Whatever of it still runs `grace_s`
    after ray.shutdown (workers notice their raylet's end slowly) is terminated, then killed. Ctrl-C
    and SIGTERM are ignored meanwhile, so that a second one cannot cut the shutdown short and leave
    processes behind."""
    ray = sys.modules.get("ray")
    if ray is None:
        return
    import psutil

    main = threading.current_thread() is threading.main_thread()
    if main:
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        # The local Ray's processes and what they started since (its workers), taken before
        # ray.shutdown: once the raylet is gone its agents are nobody's children.
        procs = {}
        for proc in _local_processes:
            procs[proc.pid] = proc
            try:
                procs.update((child.pid, child) for child in proc.children(recursive=True))
            except psutil.NoSuchProcess:
                pass
        if ray.is_initialized():
            ray.shutdown()
        _, alive = psutil.wait_procs(list(procs.values()), timeout=grace_s)
        for proc in alive:
            log.debug("stopping leftover Ray process %s (%s)", proc.pid, _name(proc))
            _signal(proc, "terminate")
        _, alive = psutil.wait_procs(alive, timeout=1.0)
        for proc in alive:
            _signal(proc, "kill")
        _local_processes.clear()
    finally:
        if main:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _name(proc) -> str:
    import psutil

    try:
        return proc.name()
    except psutil.Error:
        return "?"


def _signal(proc, how: str) -> None:
    import psutil

    try:
        # psutil refuses a pid that now belongs to another process.
        getattr(proc, how)()
    except psutil.NoSuchProcess:
        pass
