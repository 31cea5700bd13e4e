"""A real Orthanc PACS with the DICOMweb plugin, run in the foreground on 127.0.0.1 for tests and benches."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import requests

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER, PASSWORD = "voxsearch", "test-only-secret"


def available() -> str | None:
    """None when Orthanc can run here, else why not."""
    if not Path(ORTHANC).exists():
        return "Debian package 'orthanc' is not installed (scripts/setup.sh installs it as root)"
    if not PLUGIN.exists():
        return "Debian package 'orthanc-dicomweb' is not installed (scripts/setup.sh installs it as root)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.http_port = _free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.base}/dicom-web"

    def start(self, timeout: float = 60.0) -> "Orthanc":
        storage = self.workdir / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "voxsearch-test",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.http_port,
            "DicomPort": _free_port(),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: PASSWORD},
            "Plugins": [str(PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(config))
        log = open(self.workdir / "orthanc.log", "wb")
        self.proc = subprocess.Popen([ORTHANC, str(path)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}; see {self.workdir / 'orthanc.log'}")
            try:
                if requests.get(f"{self.base}/system", auth=(USER, PASSWORD), timeout=2).ok:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout} s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)

    def upload(self, files: list[Path]) -> None:
        """STOW-RS, as a modality or another PACS would send."""
        import pydicom
        from dicomweb_client.api import DICOMwebClient

        session = requests.Session()
        session.auth = (USER, PASSWORD)
        client = DICOMwebClient(url=self.dicomweb, session=session)
        client.store_instances([pydicom.dcmread(str(f)) for f in files])

    def delete_study(self, study_uid: str) -> None:
        """Orthanc's own REST API: DICOMweb has no portable delete."""
        found = requests.post(
            f"{self.base}/tools/lookup", data=study_uid, auth=(USER, PASSWORD), timeout=10
        ).json()
        for item in found:
            if item["Type"] == "Study":
                requests.delete(f"{self.base}/studies/{item['ID']}", auth=(USER, PASSWORD), timeout=10).raise_for_status()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class FaultProxy:
    """A reverse proxy on 127.0.0.1 in front of Orthanc that injects faults into WADO-RS answers.

    `faults` is consumed one entry per WADO request: "503" answers 503, "drop" sends the headers and
    part of the body then closes the connection, None forwards normally. Other requests pass through.
    """

    def __init__(self, target: str, faults: list[str | None] | None = None, always: str | None = None):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.target, self.faults, self.always = target, list(faults or []), always
        self.seen: list[str] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _forward(self, method: str):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
                wado = method == "GET" and "/series/" in self.path and "/studies/" in self.path \
                    and not self.path.split("?")[0].endswith(("/metadata",)) and "series?" not in self.path
                fault = None
                if wado:
                    proxy.seen.append(self.path)
                    fault = proxy.faults.pop(0) if proxy.faults else proxy.always
                if fault == "503":
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                upstream = requests.request(method, proxy.target + self.path, headers=headers, data=body,
                                            timeout=30, stream=True)
                payload = upstream.raw.read(decode_content=False)
                self.send_response(upstream.status_code)
                for k, v in upstream.headers.items():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length", "keep-alive"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                # This server closes after every answer; a forwarded Keep-Alive header would make the
                # client reuse a socket being closed, a spurious fault that eats one retry.
                self.send_header("Connection", "close")
                self.end_headers()
                if fault == "drop":
                    self.wfile.write(payload[: len(payload) // 3])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(payload)

            def do_GET(self):
                self._forward("GET")

            def do_POST(self):
                self._forward("POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def dicomweb(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
