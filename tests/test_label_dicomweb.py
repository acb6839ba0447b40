"""MONAI Label app over DICOMweb: Orthanc (with its DICOMweb plugin) on loopback as the datastore.

Inference on a DICOM series returns a label on the series' grid, and a label saved back reaches Orthanc as a
DICOM SEG. Needs the Label environment and Debian's orthanc + orthanc-dicomweb (skips locally, fails in CI).
"""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from support.label import (
    REPO,
    LabelServer,
    Orthanc,
    ci_requires,
    label_env_problem,
    make_checkpoint,
    offline_network,
    offline_problem,
    orthanc_problem,
)

pytestmark = [pytest.mark.label, pytest.mark.orthanc, pytest.mark.slow, pytest.mark.timeout(900)]

BUNDLE = REPO / "bundles" / "ulite"
ROWS, COLS, SLICES = 40, 44, 14


def write_ct_series(folder: Path) -> tuple[str, list[Path]]:
    """A small axial CT series (oblique-free, 0.9 x 0.8 x 2.5 mm) with a bright sphere; returns (series UID, files)."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    zz, yy, xx = np.mgrid[:SLICES, :ROWS, :COLS]
    sphere = ((zz - 7) * 2.5) ** 2 + ((yy - 20) * 0.8) ** 2 + ((xx - 22) * 0.9) ** 2 <= 10.0**2
    rng = np.random.default_rng(0)
    hu = rng.normal(40, 20, size=(SLICES, ROWS, COLS)) + 300 * sphere
    files = []
    for k in range(SLICES):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"ct_{k:03d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientID, ds.PatientName = "CT", "ULITE-TEST", "Test^Label"
        ds.StudyDate = ds.SeriesDate = datetime.date.today().strftime("%Y%m%d")
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, k + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-20.0, -16.0, -17.5 + 2.5 * k]
        ds.PixelSpacing, ds.SliceThickness = [0.8, 0.9], 2.5
        ds.Rows, ds.Columns = ROWS, COLS
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = (hu[k] + 1024).astype(np.int16).tobytes()
        ds.save_as(str(path), enforce_file_format=True)
        files.append(path)
    return series, files


def test_dicomweb_infer_and_save_label(tmp_path):
    ci_requires(label_env_problem())
    ci_requires(orthanc_problem())
    ci_requires(offline_problem())
    series, files = write_ct_series(tmp_path / "dicom")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "dicom")))
    ref = reader.Execute()

    # Orthanc, the Label server and the clients share a network namespace with loopback only: the DICOMweb
    # datastore must start without downloading dcmqi (itkimage2segimage comes from the dcmqi wheel)
    with offline_network(), Orthanc(tmp_path / "orthanc") as orthanc:
        orthanc.upload(files)
        srv = LabelServer(orthanc.dicomweb, tmp_path / "srv", conf={"bundle": str(BUNDLE)},
                          env={"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(tmp_path / "cache")})
        srv.model_dir.mkdir(parents=True)
        make_checkpoint(BUNDLE, srv.model_dir / "ulite.pt")
        with srv:
            sample = srv.client("next-sample", "--strategy", "first")  # QIDO search of Orthanc
            assert sample["id"] == series

            res = srv.client("infer", series, "--out", str(tmp_path / "pred"))
            label = sitk.ReadImage(res["label"])
            assert label.GetSize() == ref.GetSize()
            np.testing.assert_allclose(label.GetSpacing(), ref.GetSpacing(), atol=1e-3)
            np.testing.assert_allclose(label.GetOrigin(), ref.GetOrigin(), atol=1e-3)
            np.testing.assert_allclose(label.GetDirection(), ref.GetDirection(), atol=1e-4)

            # an annotator's final label (the sphere) is saved back: it must reach Orthanc as a DICOM SEG
            mask = sitk.GetImageFromArray((sitk.GetArrayFromImage(ref) > 200).astype(np.uint8))
            mask.CopyInformation(ref)
            lab_file = tmp_path / "final.nii.gz"
            sitk.WriteImage(mask, str(lab_file))
            before = len(orthanc.instances())
            saved = srv.client("save-label", series, str(lab_file))
            assert saved["image"] == series
            segs = [i for i in orthanc.instances() if i.get("Modality") == "SEG"]
            assert len(orthanc.instances()) == before + 1
            assert len(segs) == 1
            seg = segs[0]
            assert seg["StudyInstanceUID"] == pydicom.dcmread(files[0]).StudyInstanceUID
            assert seg["ReferencedSeriesSequence"][0]["SeriesInstanceUID"] == series
            assert (tmp_path / "cache").is_dir()  # the server cached the series where it was told, not in $HOME
