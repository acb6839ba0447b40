# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""PACS in and out against a real Orthanc (DICOMweb plugin + DIMSE) on loopback, in a loopback-only network
namespace: QIDO-RS filters, WADO-RS pull, resume across pulls, STOW-RS and C-STORE push with a status per
object, a rerun that pushes what failed, credentials (environment, netrc; never in the address), and TLS
verification on by default. Skips locally without Orthanc; fails under CI=true (``make sysdeps`` installs it)."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from support.dicom import make_standin_bundle, phantom, read_manifest
from support.dicom_write import write_dicom_series
from support.label import ci_requires, free_port, offline_network, offline_problem
from support.pacs import PacsOrthanc, TlsProxy, orthanc_problem, self_signed_certificate
from test_batch_cli import run_main

pytestmark = [pytest.mark.orthanc, pytest.mark.slow, pytest.mark.timeout(600)]

USERS = {"alice": "s3cret-pw"}
ARGS = ["--random-weights", "--no-progress", "--rules", "all", "--retries", "2"]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """Two CT studies (two patients) and one MR series, as files to upload."""
    root = tmp_path_factory.mktemp("pacs_export")
    files = []
    for i, (pid, date) in enumerate((("P1", "20240105"), ("P2", "20240220"))):
        files += write_dicom_series(phantom((8, 16, 16), seed=i), root / f"ct{i}", patient_id=pid,
                                    extra={"StudyDate": date}, series_description=f"CT body {i}")
    files += write_dicom_series(phantom((8, 16, 16), seed=7), root / "mr", modality="MR", patient_id="P1",
                                extra={"StudyDate": "20240105"})
    return root, files


def _require():
    ci_requires(orthanc_problem())
    ci_requires(offline_problem())


def test_pull_query_resume_and_push_by_stow_and_cstore(tmp_path, export, capsys, monkeypatch):
    _require()
    _, files = export
    bundle = make_standin_bundle(tmp_path / "bundle")
    out = tmp_path / "out"
    with offline_network(), PacsOrthanc(tmp_path / "orthanc", users=USERS) as pacs:
        pacs.upload(files)
        monkeypatch.setenv("ULITE_PACS_USER", "alice")
        monkeypatch.setenv("ULITE_PACS_PASSWORD", USERS["alice"])
        rc, stdout, err = run_main(["--from", pacs.dicomweb, "--modality", "CT", out, "--bundle", bundle, *ARGS,
                                    "--formats", "seg,nifti,rtstruct,sr,qc", "--push", pacs.dicomweb,
                                    "--push", pacs.dimse], capsys)
        assert rc == 0, err[-3000:]
        rows = [r for r in read_manifest(out).values() if r["status"] != "skipped"]
        assert len(rows) == 2 and all(r["status"] == "done" for r in rows)  # the MR series was not queried
        for r in rows:
            assert r["input"].startswith(pacs.dicomweb + "/studies/") and r["downloaded_bytes"] > 0
            assert r["push_status"] == "ok" and len(r["push"]) == 6  # 3 objects x (STOW-RS, C-STORE)
            assert {(p["destination"], p["object"]) for p in r["push"]} == {
                (d, k) for d in (pacs.dicomweb, pacs.dimse) for k in ("seg", "rtstruct", "sr")}
        stored = {i["SOPInstanceUID"]: i for i in pacs.instances()}
        for r in rows:
            for kind in ("seg", "rtstruct", "sr"):
                uid = pydicom.dcmread(out / r["outputs"][kind], stop_before_pixels=True).SOPInstanceUID
                assert uid in stored and stored[uid]["Modality"] == {"seg": "SEG", "rtstruct": "RTSTRUCT",
                                                                      "sr": "SR"}[kind]
        assert not list((out / ".tmp").glob("pull-*")) if (out / ".tmp").exists() else True
        # resume across pulls: nothing is downloaded or segmented again
        rc, stdout, _ = run_main(["--from", pacs.dicomweb, "--modality", "CT", out, "--bundle", bundle, *ARGS], capsys)
        assert rc == 0 and "2 already done" in stdout and "0 done" in stdout
        # QIDO filters: patient and study-date range, study UID, series description wildcard
        for flags, n in ((["--patient-id", "P2"], 1), (["--study-date", "20240101-20240131"], 2),
                         (["--series-description", "CT body 1*"], 1)):
            o = tmp_path / ("q" + "_".join(flags).replace("*", "").replace(" ", ""))
            rc, _, err = run_main(["--from", pacs.dicomweb, o, "--bundle", bundle, *ARGS, *flags], capsys)
            assert rc == 0, err[-2000:]
            assert sum(r["status"] == "done" for r in read_manifest(o).values()) == n, flags
        # credentials: refused in the address, from a netrc file, and a clear error without any
        with_password = pacs.dicomweb.replace("://", "://alice:pw@")
        rc, _, err = run_main(["--from", with_password, tmp_path / "x", "--bundle", bundle, *ARGS], capsys)
        assert rc == 2 and "credentials in the address are refused" in err
        monkeypatch.delenv("ULITE_PACS_USER")
        monkeypatch.delenv("ULITE_PACS_PASSWORD")
        monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc of the machine's
        rc, _, err = run_main(["--from", pacs.dicomweb, tmp_path / "y", "--bundle", bundle, *ARGS], capsys)
        assert rc == 2 and "HTTP 401" in err and "credentials" in err
        netrc = tmp_path / "netrc"
        netrc.write_text(f"machine 127.0.0.1 login alice password {USERS['alice']}\n")
        rc, _, err = run_main(["--from", pacs.dicomweb, "--modality", "MR", tmp_path / "z", "--bundle", bundle, *ARGS,
                               "--netrc", netrc], capsys)
        assert rc == 0 and sum(r["status"] == "done" for r in read_manifest(tmp_path / "z").values()) == 1, err


def test_failed_push_is_recorded_then_retried_by_the_rerun(tmp_path, export, capsys):
    _require()
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    root, _ = export
    bundle = make_standin_bundle(tmp_path / "bundle")
    port = free_port()
    dest = f"dimse://STORESCP@127.0.0.1:{port}"
    with offline_network():
        rc, stdout, _ = run_main([root / "ct0", tmp_path / "out", "--bundle", bundle, *ARGS, "--push", dest], capsys)
        (row,) = [r for r in read_manifest(tmp_path / "out").values() if r["status"] == "done"]
        assert rc == 4 and row["push_status"] == "failed" and row["push"][0]["attempts"] == 2
        assert "association rejected or aborted" in row["push"][0]["error"]
        received = []

        def on_store(event):
            received.append(event.dataset.SOPInstanceUID)
            return 0x0000

        ae = AE(ae_title="STORESCP")
        ae.supported_contexts = AllStoragePresentationContexts
        server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
        try:
            rc, stdout, err = run_main([root / "ct0", tmp_path / "out", "--bundle", bundle, *ARGS, "--push", dest],
                                       capsys)
        finally:
            server.shutdown()
        (row,) = [r for r in read_manifest(tmp_path / "out").values() if r["status"] == "done"]
        assert rc == 0 and "1 already done" in stdout, err[-2000:]
        assert row["push_status"] == "ok" and len(received) == 1
        assert received[0] == pydicom.dcmread(tmp_path / "out" / row["outputs"]["seg"]).SOPInstanceUID


def test_tls_is_verified_by_default(tmp_path, export, capsys, monkeypatch):
    _require()
    _, files = export
    pem, cert = self_signed_certificate(tmp_path / "tls")
    bundle = make_standin_bundle(tmp_path / "bundle")
    with offline_network(), PacsOrthanc(tmp_path / "orthanc") as pacs, TlsProxy(pacs.url, pem) as tls:
        pacs.upload(files[:8])
        monkeypatch.setenv("HOME", str(tmp_path))
        for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE"):
            monkeypatch.delenv(var, raising=False)
        url = tls.url + "/dicom-web"
        rc, _, err = run_main(["--from", url, tmp_path / "a", "--bundle", bundle, *ARGS], capsys)
        assert rc == 2 and "TLS certificate not trusted" in err
        rc, _, err = run_main(["--from", url.replace("https://", "dicomweb://"), tmp_path / "a", "--bundle", bundle,
                               *ARGS], capsys)  # dicomweb:// is HTTPS
        assert rc == 2 and "TLS certificate not trusted" in err
        rc, _, err = run_main(["--from", url, tmp_path / "b", "--bundle", bundle, *ARGS, "--ca-bundle", cert], capsys)
        assert rc == 0, err[-2000:]
        rows = read_manifest(tmp_path / "b").values()
        assert [r["status"] for r in rows] == ["done"] and np.all([r["input"].startswith("https://") for r in rows])
