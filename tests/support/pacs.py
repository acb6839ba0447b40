# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""A PACS for tests and measurements: Orthanc with DICOMweb and DIMSE, optional users and TLS, on loopback.

Orthanc 1.10 cannot bind its DICOM port to one address, so callers start it inside
``support.label.offline_network()`` (a network namespace with loopback only) when it must not be reachable
from elsewhere; HTTP is refused to remote hosts in any case (``RemoteAccessAllowed: false``). Storage and
index go to ``workdir``; the process is stopped by its own PID.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from support.label import ORTHANC_DICOMWEB_PLUGINS, _tail, free_port, orthanc_problem, stop_process

__all__ = ["PacsOrthanc", "TlsProxy", "self_signed_certificate", "orthanc_problem"]


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 made with openssl: (PEM with key + certificate for Orthanc, certificate)."""
    folder.mkdir(parents=True, exist_ok=True)
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    both = folder / "orthanc.pem"
    both.write_bytes(key.read_bytes() + cert.read_bytes())
    return both, cert


class PacsOrthanc:
    """Orthanc on 127.0.0.1 with DICOMweb (``dicomweb``) and a DICOM port (``dimse``, AE ``ORTHANC``).

    Args:
        workdir: storage, configuration and log.
        users: ``{name: password}``: HTTP basic authentication on (off when None).
        tls_pem: key + certificate PEM: HTTPS instead of HTTP (Debian's Orthanc 1.10 crashes on its first HTTPS
            request, so the tests put :class:`TlsProxy` in front of it instead).
    """

    def __init__(self, workdir: Path, users: dict[str, str] | None = None, tls_pem: Path | None = None,
                 start_timeout: float = 60) -> None:
        self.workdir = Path(workdir)
        self.users, self.tls_pem = users, tls_pem
        self.http_port, self.dicom_port = free_port(), free_port()
        scheme = "https" if tls_pem else "http"
        self.url = f"{scheme}://127.0.0.1:{self.http_port}"
        self.dicomweb = f"{self.url}/dicom-web"
        self.aet = "ORTHANC"
        self.dimse = f"dimse://{self.aet}@127.0.0.1:{self.dicom_port}"
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.log = self.workdir / "orthanc.log"

    def start(self) -> PacsOrthanc:
        self.workdir.mkdir(parents=True, exist_ok=True)
        plugin = next(p for p in ORTHANC_DICOMWEB_PLUGINS if os.path.exists(p))
        config = {
            "Name": "ulite-pacs-test", "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "storage"), "HttpPort": self.http_port, "HttpServerEnabled": True,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users or {}, "DicomServerEnabled": True, "DicomAet": self.aet,
            "DicomPort": self.dicom_port, "DicomCheckCalledAet": True, "DicomAlwaysAllowStore": True,
            "Plugins": [plugin], "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True},
            "SslEnabled": bool(self.tls_pem), "SslCertificate": str(self.tls_pem or ""),
        }
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(config, indent=2))
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(["Orthanc", str(cfg)], stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        deadline = time.time() + self.start_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}:\n{_tail(self.log)}")
            try:
                self.get("/system")
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"Orthanc not up after {self.start_timeout} s:\n{_tail(self.log)}")

    def _request(self, path: str, method: str = "GET", data: bytes | None = None, headers: dict | None = None):
        headers = dict(headers or {})
        if self.users:
            user, pw = next(iter(self.users.items()))
            headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()
        ctx = None
        if self.tls_pem:
            import ssl

            ctx = ssl.create_default_context(cafile=str(self.tls_pem))
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=30, context=ctx) as r:
            body = r.read()
        return json.loads(body) if body else None

    def get(self, path: str):
        return self._request(path)

    def upload(self, files) -> None:
        for f in files:
            self._request("/instances", "POST", Path(f).read_bytes(), {"Content-Type": "application/dicom"})

    def instances(self) -> list[dict]:
        """Every stored instance's main tags (simplified)."""
        return [self.get(f"/instances/{i}/simplified-tags") for i in self.get("/instances")]

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def __enter__(self) -> PacsOrthanc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class TlsProxy:
    """An HTTPS front for an HTTP server on 127.0.0.1 (a TLS-terminating reverse proxy, threads, one process).

    Args:
        backend: ``http://127.0.0.1:PORT`` to forward to.
        pem: key + certificate PEM to serve.
    """

    def __init__(self, backend: str, pem: Path) -> None:
        import http.client
        import ssl
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        target = urlsplit(backend)

        class Handler(BaseHTTPRequestHandler):
            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_POST = do_PUT = do_DELETE = _forward

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(pem))
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> TlsProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
