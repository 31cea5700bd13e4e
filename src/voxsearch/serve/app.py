"""Compose the deployments behind the ingress and run them on Ray Serve (local Ray or a cluster)."""

from __future__ import annotations

import logging
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

from voxsearch.common.storage import is_uri
from voxsearch.serve.config import ServeConfig, ServeConfigError

log = logging.getLogger("voxsearch.serve")


def added_dir(config: ServeConfig) -> str:
    """Where API-added studies live: the configured data_dir, else beside the index."""
    if config.data_dir:
        return str(Path(config.data_dir))
    index = Path(config.index).resolve()
    return str(index.parent / f"{index.name}.added")


def _absolute(value: str) -> str:
    """A local path made absolute; an s3:// or gs:// URI unchanged (Path would fold its "//")."""
    return value if is_uri(value) else str(Path(value).resolve())


def build_app(config: ServeConfig):
    """The Serve application: Ingress(TextEncoder, ImageEncoder, IndexSearcher, StudyStore, ReportDrafter);
    with ``colocate_data`` the searcher and the study store run inside the ingress replicas."""
    from voxsearch.serve.api import Ingress
    from voxsearch.serve.deployments import ImageEncoder, IndexSearcher, ReportDrafter, StudyStore, TextEncoder

    d = config.deployments
    # Paths are made absolute here: replicas may start in another working directory (or on another node).
    config = replace(
        config,
        index=_absolute(config.index),
        checkpoint=_absolute(config.checkpoint),
        catalog=_absolute(config.catalog),
        report_model=_absolute(config.report_model) if config.report_model else None,
        data_dir=_absolute(config.data_dir) if config.data_dir else None,
        upload_dir=_absolute(config.upload_dir) if config.upload_dir else None,
    )

    def options(deployment, same_thread: bool = True) -> dict:
        opts = {**deployment.serve_options(), "logging_config": {"enable_access_log": config.access_log}}
        if same_thread:
            # Serve runs a replica's code on an event loop of its own thread by default; each request then
            # crosses threads twice. These replicas never block their loop (CPU work goes to worker
            # threads), so they run on the replica's main loop: ~15% more searches per core.
            opts["ray_actor_options"] = {**opts["ray_actor_options"],
                                         "runtime_env": {"env_vars": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}}}
        return opts

    text = TextEncoder.options(**options(d.text_encoder)).bind(config)
    image = ImageEncoder.options(**options(d.image_encoder)).bind(config)
    searcher = studies = None
    if not config.colocate_data:
        searcher = IndexSearcher.options(**options(d.searcher)).bind(config)
        studies = StudyStore.options(**options(d.studies)).bind(config, added_dir(config))
    # The report model decodes token by token in a synchronous generator: it keeps its own thread.
    reporter = ReportDrafter.options(**options(d.reporter, same_thread=False)).bind(config)
    return Ingress.options(**options(d.ingress)).bind(config, text, image, searcher, studies, reporter)


def serve_http_bind() -> tuple[str, int]:
    """Where Serve's HTTP proxy really listens: an instance already running in the cluster keeps its own
    host and port whatever serve.start was asked for."""
    from ray.serve.context import _get_global_client

    try:
        http = _get_global_client().http_config
        return str(http.host), int(http.port)
    except Exception as exc:  # noqa: BLE001 - private API: without it, where the proxy listens is unknown
        raise ServeConfigError(
            f"cannot tell where Serve's HTTP proxy listens ({exc.__class__.__name__}); "
            "refusing to start without knowing whether API keys are needed"
        ) from exc


def start(config: ServeConfig, ray_address: str | None = None, ready_timeout_s: float = 300.0) -> str:
    """Start (or update) the app and wait until /api/v1/ready answers 200; returns the base URL.

    Whether API keys are required is decided from where the proxy really listens (see
    ServeConfig.bound_to), and the replicas get that address, so the loopback Host/Origin checks know it.
    """
    from ray import serve

    from voxsearch.common.runtime import RayConfig, init_ray
    from voxsearch.serve.deployments import check_before_start

    config.validate()
    check_before_start(config)
    init_ray(RayConfig(address=ray_address))
    serve.start(http_options={"host": config.host, "port": config.port})
    config = config.bound_to(*serve_http_bind())
    serve.run(build_app(config), name=config.app_name, route_prefix="/", blocking=False)
    url = f"http://{url_host(config.host)}:{config.port}"
    wait_ready(url, ready_timeout_s)
    return url


def url_host(host: str) -> str:
    """How a client on this machine reaches a proxy bound to `host`."""
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def wait_ready(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/api/v1/ready", timeout=10) as response:
                if response.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.5)
    raise TimeoutError(f"voxsearch app at {url} was not ready after {timeout_s:.0f}s (last: {last})")


def stop(config: ServeConfig) -> None:
    """Remove the app (only this app: on a cluster, Serve and other apps keep running)."""
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client

    # Stopped before Ray or Serve started: nothing was deployed, and asking Serve would start them.
    if not ray.is_initialized() or _get_global_client(raise_if_no_controller_running=False) is None:
        return
    serve.delete(config.app_name)


def serve_until_stopped(config: ServeConfig, ray_address: str | None = None, exit_after: float | None = None,
                        banner=None) -> int:
    """Start the app, print where it is, block until Ctrl-C (or SIGTERM, through the command line's
    handler) or `exit_after` seconds, then remove it; stopped while it starts, it is removed too."""
    try:
        url = start(config, ray_address=ray_address)
        print(f"voxsearch is serving at {url}/  (API docs: {url}/api/v1/docs)", flush=True)
        if banner:
            banner(url)
        if exit_after is not None:
            time.sleep(max(0.0, exit_after))
        else:
            print("press Ctrl-C to stop", flush=True)
            while True:
                time.sleep(3600)
    except ServeConfigError as exc:
        print(f"voxsearch serve: {exc}", flush=True)
        return 2
    except KeyboardInterrupt:
        print("\nstopping", flush=True)
    stop(config)
    return 0
