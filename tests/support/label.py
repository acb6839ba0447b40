"""Helpers to drive a real MONAI Label server and Orthanc on loopback (tests, latency script).

Runs from the project environment: everything that needs monailabel runs as a subprocess with the Label
environment's python (``.venv-label/bin/python``), so this module imports neither monailabel nor torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing_extensions import Self

REPO = Path(__file__).resolve().parents[2]
ORTHANC_DICOMWEB_PLUGINS = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so",
)


def label_python() -> Path:
    """The Label environment's python: ``$ULITE_LABEL_PYTHON`` or ``.venv-label/bin/python`` of this tree."""
    return Path(os.environ.get("ULITE_LABEL_PYTHON", REPO / ".venv-label" / "bin" / "python"))


def label_env_problem() -> str | None:
    """``None`` when the Label environment can run the app, else what is missing and how to make it."""
    py = label_python()
    if not py.exists():
        return f"{py} not found: run `make label-venv`"
    probe = subprocess.run(
        [str(py), "-c", "import monailabel, ulite_monai.label.lib.infers"], capture_output=True, text=True, check=False
    )
    if probe.returncode != 0:
        return f"{py} cannot import monailabel / ulite_monai.label: {probe.stderr.strip()[-400:]} (make label-venv)"
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, method: str = "GET", data: bytes | None = None, headers: dict | None = None,
              timeout: float = 30) -> Any:
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        body = r.read()
    return json.loads(body) if body else None


def stop_process(proc: subprocess.Popen, timeout: float = 20) -> None:
    """Stop a process we started, by its own PID: SIGTERM, then SIGKILL."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


class LabelServer:
    """``python -m ulite_monai.label.serve`` on 127.0.0.1 with a free port; a context manager.

    Args:
        studies: NIfTI folder or DICOMweb URL.
        workdir: where the log and the app's ``model_dir`` go.
        conf: extra ``--conf`` pairs (``bundle``, ``configs``, ...).
        env: extra environment variables for the server.
    """

    def __init__(self, studies: str, workdir: Path, conf: dict[str, str] | None = None,
                 env: dict[str, str] | None = None, start_timeout: float = 180):
        self.studies = studies
        self.workdir = Path(workdir)
        self.model_dir = self.workdir / "model"
        self.conf = {"model_dir": str(self.model_dir), **(conf or {})}
        self.env = env or {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = self.workdir / "server.log"
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        cmd = [str(label_python()), "-m", "ulite_monai.label.serve", "--studies", self.studies, "--port", str(self.port)]
        for k, v in self.conf.items():
            cmd += ["--conf", k, v]
        return cmd

    def start(self) -> LabelServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.model_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env}
        env.pop("PYTHONPATH", None)
        with open(self.log, "wb") as log:
            # own session: the server's subprocesses (training) stay in its process group
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                         env=env, start_new_session=True)
        deadline = time.time() + self.start_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"MONAI Label server exited with {self.proc.returncode}:\n{_tail(self.log)}")
            try:
                http_json(self.url + "/info/", timeout=5)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"MONAI Label server not up after {self.start_timeout} s:\n{_tail(self.log)}")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def log_tail(self) -> str:
        return _tail(self.log)

    def client(self, *args: str, timeout: float = 600) -> Any:
        """Run ``ulite_monai.label.lib.client`` (the real MONAILabelClient) in the Label environment; its JSON."""
        cmd = [str(label_python()), "-m", "ulite_monai.label.lib.client", "--server", self.url, *args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.workdir, check=False)
        if r.returncode != 0:
            raise RuntimeError(
                f"client {' '.join(args)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}\n"
                f"--- server log ---\n{self.log_tail()}"
            )
        return json.loads(r.stdout.strip().splitlines()[-1])

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_label_python(code: str, *args: str, timeout: float = 300) -> str:
    """Run a snippet in the Label environment; its stdout (raises with stderr on failure)."""
    r = subprocess.run([str(label_python()), "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                       check=False)
    if r.returncode != 0:
        raise RuntimeError(f"label python failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r.stdout


_CHECKPOINT_SNIPPET = r"""
import sys, torch
from ulite_monai.bundle import Bundle
bundle_dir, configs, out, calib = sys.argv[1], sys.argv[2] or None, sys.argv[3], sys.argv[4]
parser = Bundle(bundle_dir, configs).parser("inference")
torch.manual_seed(0)
net = parser.get_parsed_content("network_def").eval()
if calib:
    # shift the last layer's foreground bias so that about half of this image comes out foreground: the label
    # then has structure (from the random features) and a flip or transpose anywhere would show
    data = parser.get_parsed_content("preprocessing")({"image": calib})
    with torch.no_grad():
        logits = parser.get_parsed_content("inferer")(data["image"][None], net)
    last = [m for m in net.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)][-1]
    with torch.no_grad():
        last.bias[1:] -= (logits[0, 1:] - logits[0, :1]).flatten(1).median(dim=1).values
torch.save(net.state_dict(), out)
"""


def make_checkpoint(bundle_dir: str | Path, out: str | Path, configs: str = "", calibrate_on: str = "") -> None:
    """A checkpoint of the bundle's ``network_def`` with seeded initial weights (saved as a plain state dict).

    Args:
        calibrate_on: an image; the foreground bias is shifted so that about half of it is segmented.
    """
    run_label_python(_CHECKPOINT_SNIPPET, str(bundle_dir), configs, str(out), calibrate_on)


def orthanc_problem() -> str | None:
    if shutil.which("Orthanc") is None:
        return "Orthanc not installed: apt-get install -y orthanc orthanc-dicomweb"
    if not any(os.path.exists(p) for p in ORTHANC_DICOMWEB_PLUGINS):
        return "Orthanc DICOMweb plugin not installed: apt-get install -y orthanc-dicomweb"
    return None


class Orthanc:
    """Orthanc with the DICOMweb plugin on a free loopback port, storage in ``workdir``; a context manager."""

    def __init__(self, workdir: Path, start_timeout: float = 60):
        self.workdir = Path(workdir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dicomweb = f"{self.url}/dicom-web"
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.log = self.workdir / "orthanc.log"

    def start(self) -> Orthanc:
        self.workdir.mkdir(parents=True, exist_ok=True)
        plugin = next(p for p in ORTHANC_DICOMWEB_PLUGINS if os.path.exists(p))
        config = {
            "Name": "ulite-test",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "storage"),
            "HttpPort": self.port,
            "HttpServerEnabled": True,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": False,
            "DicomPort": free_port(),
            "Plugins": [plugin],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False},
        }
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(config, indent=2))
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(["Orthanc", str(cfg)], stdout=log, stderr=subprocess.STDOUT,
                                         cwd=self.workdir)
        deadline = time.time() + self.start_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}:\n{_tail(self.log)}")
            try:
                http_json(self.url + "/system", timeout=5)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"Orthanc not up after {self.start_timeout} s:\n{_tail(self.log)}")

    def upload(self, files: Sequence[Path]) -> None:
        for f in files:
            http_json(self.url + "/instances", method="POST", data=Path(f).read_bytes(),
                      headers={"Content-Type": "application/dicom"})

    def instances(self) -> list[dict]:
        """Every stored instance with its main tags (Modality, SOPClassUID, series)."""
        out = []
        for iid in http_json(self.url + "/instances"):
            tags = http_json(f"{self.url}/instances/{iid}/simplified-tags")
            out.append(tags)
        return out

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_CLONE_NEWNET = 0x40000000


def offline_problem() -> str | None:
    """``None`` when this machine lets us make a network namespace with only loopback (root, util-linux, ip)."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare (util-linux) or ip (iproute2) missing"
    r = subprocess.run(["unshare", "-n", "ip", "link", "set", "lo", "up"], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        return f"cannot create a network namespace: {r.stderr.strip()}"
    return None


@contextlib.contextmanager
def offline_network():
    """Run the block (and every process it starts) in a fresh network namespace that has only loopback.

    A server started inside cannot download anything: what works here works offline. The calling thread moves
    into the namespace and is moved back afterwards.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    original = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
    try:
        if libc.unshare(_CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")
        try:
            subprocess.run(["ip", "link", "set", "lo", "up"], check=True, capture_output=True)
            links = subprocess.run(["ip", "-o", "link"], check=True, capture_output=True, text=True).stdout
            names = [line.split(":")[1].strip().split("@")[0] for line in links.splitlines() if line.strip()]
            if names != ["lo"]:
                raise RuntimeError(f"offline namespace has other interfaces: {names}")
            yield
        finally:
            if libc.setns(original, _CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns back to the original network namespace: {os.strerror(err)}")
    finally:
        os.close(original)


def ci_requires(problem: str | None) -> None:
    """Skip locally when an optional tool is missing, but fail under CI=true, where it must be installed."""
    if problem is None:
        return
    import pytest

    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but {problem}", pytrace=False)
    pytest.skip(problem)


if __name__ == "__main__":  # pragma: no cover - quick manual check
    print(label_env_problem() or "label environment OK", file=sys.stderr)
