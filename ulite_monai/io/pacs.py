# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""PACS clients: DICOMweb (QIDO-RS, WADO-RS, STOW-RS with dicomweb-client) and DIMSE C-STORE (pynetdicom).

Addresses:

* ``dicomweb://HOST[:PORT]/PATH`` (HTTPS) or ``https://...`` / ``http://...``: a DICOMweb service root,
  e.g. ``dicomweb://pacs.example.org/dicom-web``. Plain ``http://`` is for loopback and test servers.
* ``dimse://CALLED_AE@HOST:PORT`` (``?calling=OUR_AE``, default ``ULITE``): a DICOM storage SCP.

Credentials never come from the command line (an address with ``user:password@`` is refused). They come from
the environment, ``ULITE_PACS_TOKEN`` (a bearer token) or ``ULITE_PACS_USER`` + ``ULITE_PACS_PASSWORD``, or else
from a netrc file (``--netrc FILE``, ``$NETRC`` or ``~/.netrc``) entry for the host. TLS certificates are
verified (``--ca-bundle FILE`` for a private CA); there is no switch to turn verification off.
"""

from __future__ import annotations

import netrc
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator
from urllib.parse import parse_qs, urlsplit

from pydicom.dataset import Dataset

__all__ = ["PacsAddress", "parse_address", "PacsError", "DicomWebPacs", "DimseStore", "open_store", "retry",
           "credentials"]


class PacsError(RuntimeError):
    """A PACS request failed; the message names the server and what went wrong."""


@dataclass
class PacsAddress:
    """A parsed PACS address (see the module docstring). ``text`` is the address as shown in the manifest."""

    kind: str  # "dicomweb" or "dimse"
    url: str = ""  # dicomweb: the service root (http/https)
    host: str = ""
    port: int = 0
    called_ae: str = ""
    calling_ae: str = "ULITE"
    text: str = ""


def parse_address(text: str) -> PacsAddress:
    """Parse a ``dicomweb://``, ``http(s)://`` or ``dimse://`` address; ``ValueError`` with what is wrong."""
    parts = urlsplit(text)
    if parts.scheme != "dimse" and (parts.username or parts.password) or parts.scheme == "dimse" and parts.password:
        raise ValueError(f"{parts.scheme}://...: credentials in the address are refused (they would show in process "
                         "lists and logs); set ULITE_PACS_USER/ULITE_PACS_PASSWORD or ULITE_PACS_TOKEN, or use a "
                         "netrc file")
    if parts.scheme in ("dicomweb", "https", "http"):
        scheme = "https" if parts.scheme in ("dicomweb", "https") else "http"
        if not parts.hostname:
            raise ValueError(f"{text}: no host")
        url = f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}"
        return PacsAddress("dicomweb", url=url, host=parts.hostname, port=parts.port or 0, text=url)
    if parts.scheme == "dimse":
        if not parts.hostname or not parts.port or "@" not in parts.netloc:
            raise ValueError(f"{text}: expected dimse://CALLED_AE@HOST:PORT")
        called = parts.netloc.split("@", 1)[0]
        calling = parse_qs(parts.query).get("calling", ["ULITE"])[0]
        for ae in (called, calling):
            if not 0 < len(ae) <= 16:
                raise ValueError(f"{text}: AE title {ae!r} must have 1 to 16 characters")
        return PacsAddress("dimse", host=parts.hostname, port=parts.port, called_ae=called, calling_ae=calling,
                           text=f"dimse://{called}@{parts.hostname}:{parts.port}")
    raise ValueError(f"{text}: unknown PACS address; use dicomweb://HOST/PATH, https://..., http://... or "
                     "dimse://AE@HOST:PORT")


def credentials(host: str, netrc_file: str | None = None) -> tuple[str, Any] | None:
    """``("bearer", token)``, ``("basic", (user, password))`` or None, from the environment or a netrc file."""
    env = os.environ
    if env.get("ULITE_PACS_TOKEN"):
        return "bearer", env["ULITE_PACS_TOKEN"]
    if env.get("ULITE_PACS_USER"):
        return "basic", (env["ULITE_PACS_USER"], env.get("ULITE_PACS_PASSWORD", ""))
    path = netrc_file or env.get("NETRC") or os.path.expanduser("~/.netrc")
    if not os.path.isfile(path):
        if netrc_file:
            raise ValueError(f"netrc file {netrc_file} not found")
        return None
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (netrc.NetrcParseError, OSError) as e:
        raise ValueError(f"netrc file {path}: {e}") from e
    return ("basic", (entry[0], entry[2] or "")) if entry else None


def retry(call: Callable[[], Any], attempts: int = 3, delay_s: float = 1.0) -> tuple[Any, int]:
    """Run ``call`` up to ``attempts`` times (waiting ``delay_s``, doubled each time); (result, attempts used).
    The last error is raised."""
    for i in range(1, attempts + 1):
        try:
            return call(), i
        except Exception:
            if i == attempts:
                raise
            time.sleep(delay_s * 2 ** (i - 1))
    raise AssertionError("unreachable")


def _explain(e: Exception, where: str) -> PacsError:
    import requests

    if isinstance(e, requests.exceptions.SSLError):
        return PacsError(f"{where}: TLS certificate not trusted ({e.__class__.__name__}); pass --ca-bundle with the "
                         "server's CA certificate")
    if isinstance(e, requests.exceptions.HTTPError) and e.response is not None:
        code = e.response.status_code
        hint = " (check the credentials)" if code in (401, 403) else ""
        return PacsError(f"{where}: HTTP {code} {e.response.reason}{hint}")
    if isinstance(e, requests.exceptions.ConnectionError):
        return PacsError(f"{where}: cannot connect ({e.__class__.__name__})")
    return PacsError(f"{where}: {type(e).__name__}: {e}")


class DicomWebPacs:
    """A DICOMweb service (dicomweb-client underneath) with this module's credential and TLS rules.

    Args:
        address: a parsed ``dicomweb`` address.
        ca_bundle: CA certificate file for TLS verification (default: the system's / certifi's).
        netrc_file: netrc file for credentials (see :func:`credentials`).
        timeout_s: per-request timeout.
    """

    def __init__(self, address: PacsAddress, ca_bundle: str | None = None, netrc_file: str | None = None,
                 timeout_s: float = 60.0) -> None:
        from dicomweb_client.api import DICOMwebClient
        from dicomweb_client.session_utils import create_session

        self.address = address
        session = create_session()
        session.verify = ca_bundle or True
        cred = credentials(address.host, netrc_file)
        if cred and cred[0] == "bearer":
            session.headers["Authorization"] = f"Bearer {cred[1]}"
        elif cred:
            session.auth = cred[1]
        self.client = DICOMwebClient(address.url, session=session)
        self.client.set_http_retry_params(retry=False)
        self.timeout_s = timeout_s

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as e:
            raise _explain(e, f"{self.address.text} {what}") from e

    def search_series(self, study_filters: dict[str, str], series_filters: dict[str, str],
                      study_uids: list[str] | None = None) -> list[tuple[str, str, dict]]:
        """QIDO-RS: (study UID, series UID, series attributes) of the series matching the filters.

        Studies are searched first (``study_filters``: PatientID, StudyDate ranges ``YYYYMMDD-YYYYMMDD``, ...,
        or the given ``study_uids``), then their series (``series_filters``: SeriesInstanceUID, Modality, ...;
        SeriesDescription, with ``*``/``?`` wildcards and ignoring case, is matched on the returned attributes)."""
        if study_uids:
            studies = list(study_uids)
        else:
            found = self._call("QIDO-RS studies", lambda: self.client.search_for_studies(
                search_filters=study_filters or None, get_remaining=True))
            studies = [_value(s, "0020000D") for s in found]
        import fnmatch

        series_filters = dict(series_filters)
        # matched here, the same on every server (some match descriptions case-sensitively, some not at all)
        description = series_filters.pop("SeriesDescription", None)
        out = []
        for st in studies:
            for filters in _split_multi(series_filters):
                found = self._call("QIDO-RS series", lambda st=st, f=filters: self.client.search_for_series(
                    study_instance_uid=st, search_filters=f or None, fields=["SeriesDescription"],
                    get_remaining=True))
                out += [(st, _value(s, "0020000E"), s) for s in found if description is None
                        or fnmatch.fnmatch(_value(s, "0008103E").casefold(), description.casefold())]
        seen, unique = set(), []
        for st, se, attrs in out:
            if (st, se) not in seen:
                seen.add((st, se))
                unique.append((st, se, attrs))
        return unique

    def series_metadata(self, study_uid: str, series_uid: str) -> list[Dataset]:
        """WADO-RS metadata: the instance headers of a series (no pixel data)."""
        meta = self._call("WADO-RS metadata", lambda: self.client.retrieve_series_metadata(study_uid, series_uid))
        return [Dataset.from_json(m, bulk_data_uri_handler=lambda *a: b"") for m in meta]

    def iter_series(self, study_uid: str, series_uid: str) -> Iterator[Dataset]:
        """WADO-RS: the instances of a series, one at a time (streamed)."""
        try:
            yield from self.client.iter_series(study_uid, series_uid)
        except Exception as e:
            raise _explain(e, f"{self.address.text} WADO-RS series {series_uid}") from e

    def store(self, ds: Dataset) -> None:
        """STOW-RS one instance; raises :class:`PacsError` when the server does not store it."""
        resp = self._call("STOW-RS", lambda: self.client.store_instances([ds]))
        failed = resp.get("FailedSOPSequence") if resp is not None else None
        if failed:
            reason = failed[0].get("FailureReason", "?")
            raise PacsError(f"{self.address.text} STOW-RS: instance refused (failure reason {reason})")


class DimseStore:
    """C-STORE to a DICOM storage SCP with pynetdicom (one association per call)."""

    def __init__(self, address: PacsAddress, timeout_s: float = 30.0) -> None:
        self.address = address
        self.timeout_s = timeout_s

    def store(self, ds: Dataset) -> None:
        from pynetdicom import AE
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

        ae = AE(ae_title=self.address.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        ts = str(ds.file_meta.TransferSyntaxUID) if "TransferSyntaxUID" in getattr(ds, "file_meta", {}) else None
        ae.add_requested_context(ds.SOPClassUID, list(dict.fromkeys(
            [t for t in (ts, ExplicitVRLittleEndian, ImplicitVRLittleEndian) if t])))
        a = self.address
        assoc = ae.associate(a.host, a.port, ae_title=a.called_ae)
        if not assoc.is_established:
            raise PacsError(f"{a.text}: association rejected or aborted (check the AE titles and that the SCP "
                            "accepts this storage class)")
        try:
            if not assoc.accepted_contexts:
                raise PacsError(f"{a.text}: the SCP accepts no presentation context for SOP class {ds.SOPClassUID}")
            status = assoc.send_c_store(ds)
        finally:
            assoc.release()
        code = int(status.Status) if status and "Status" in status else None
        if code is None:
            raise PacsError(f"{a.text}: C-STORE got no response (connection lost or timed out)")
        if code not in (0x0000, 0xB000, 0xB006, 0xB007):
            raise PacsError(f"{a.text}: C-STORE failed with status 0x{code:04X}")


def open_store(address: PacsAddress, ca_bundle: str | None = None, netrc_file: str | None = None):
    """A client with ``store(ds)`` for the address (STOW-RS or C-STORE)."""
    return DicomWebPacs(address, ca_bundle, netrc_file) if address.kind == "dicomweb" else DimseStore(address)


def _value(attrs: dict, tag: str) -> str:
    v = attrs.get(tag, {}).get("Value", [""])
    return str(v[0]) if v else ""


def _split_multi(filters: dict[str, Any]) -> list[dict[str, str]]:
    """QIDO takes one value per key; a list value (several series UIDs) becomes several queries."""
    key = next((k for k, v in filters.items() if isinstance(v, (list, tuple))), None)
    if key is None:
        return [dict(filters)]
    rest = {k: v for k, v in filters.items() if k != key}
    return [q for v in filters[key] for q in _split_multi({**rest, key: v})]
