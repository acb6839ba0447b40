# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""A DICOM SR volume report (TID 1500 Measurement Report, Comprehensive 3D SR) per series, with highdicom.sr.

One TID 1410 "Volumetric ROI measurements" group per segment of the SEG, referencing that SEG segment and the
source series, with the segment's volume (ml) and, for CT and MR, the mean and standard deviation of the source
intensity inside it (HU for CT, arbitrary units for MR). The algorithm (bundle name and version) is the
observer device and the algorithm identification of each group.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from pydicom.dataset import Dataset

from ulite_monai.io.dicom_seg import SegmentInfo
from ulite_monai.io.dicom_series import SeriesVolume
from ulite_monai.utils import save_atomically

__all__ = ["segment_statistics", "build_volume_report", "write_volume_report"]

_ML = ("ml", "UCUM", "milliliter")
_INTENSITY = {  # modality -> (name code, unit code)
    "CT": (("112031", "DCM", "Attenuation Coefficient"), ("[hnsf'U]", "UCUM", "Hounsfield unit")),
    "MR": (("110852", "DCM", "MR signal intensity"), ("[arb'U]", "UCUM", "arbitrary unit")),
}


def segment_statistics(labels: np.ndarray, volume: SeriesVolume, segments: Sequence[SegmentInfo]) -> dict[int, dict]:
    """Per label value: voxel count, volume (ml), mean and standard deviation of the source intensity."""
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    stats = {}
    for s in segments:
        mask = labels == s.number
        n = int(mask.sum())
        values = volume.array[mask].astype(np.float64) if n else np.zeros(0)
        stats[s.number] = {"voxels": n, "volume_ml": n * voxel_ml,
                           "mean": float(values.mean()) if n else None, "std": float(values.std()) if n else None}
    return stats


def build_volume_report(
    seg: Dataset,
    labels: np.ndarray,
    volume: SeriesVolume,
    segments: Sequence[SegmentInfo],
    algorithm_name: str,
    algorithm_version: str,
    series_number: int = 9903,
    manufacturer: str = "ulite-monai",
):
    """A highdicom ``Comprehensive3DSR`` reporting each SEG segment (SEG segment ``i`` is ``segments[i - 1]``)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    sources = list(volume.datasets.values())
    modality = str(sources[0].get("Modality", ""))
    series_uid = str(sources[0].SeriesInstanceUID)
    algo = hd.sr.AlgorithmIdentification(name=algorithm_name[:64], version=str(algorithm_version)[:64])
    stats = segment_statistics(labels, volume, segments)
    groups = []
    for i, s in enumerate(segments, start=1):
        st = stats[s.number]
        measurements = [hd.sr.Measurement(name=codes.SCT.Volume, value=round(st["volume_ml"], 4),
                                          unit=hd.sr.CodedConcept(*_ML), algorithm_id=algo)]
        if modality in _INTENSITY and st["voxels"]:
            name, unit = (hd.sr.CodedConcept(*c) for c in _INTENSITY[modality])
            for derivation, value in ((codes.SCT.Mean, st["mean"]), (codes.SCT.StandardDeviation, st["std"])):
                measurements.append(hd.sr.Measurement(name=name, value=round(value, 4), unit=unit,
                                                      derivation=derivation, algorithm_id=algo))
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=f"segment {i}: {s.label}"[:64]),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID, segment_number=i,
                source_series=hd.sr.SourceSeriesForSegmentation(series_uid)),
            finding_type=hd.sr.CodedConcept(*s.type),
            finding_category=hd.sr.CodedConcept(*s.category),
            algorithm_id=algo,
            measurements=measurements,
        ))
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(), name=algorithm_name[:64], manufacturer_name=manufacturer,
            model_name=f"{algorithm_name} {algorithm_version}"[:64]),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=hd.sr.CodedConcept("363679005", "SCT", "Imaging procedure"),
        imaging_measurements=groups,
    )
    return hd.sr.Comprehensive3DSR(
        evidence=[seg, *sources], content=report[0], series_instance_uid=generate_uid(), series_number=series_number,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer=manufacturer, is_complete=True,
        series_description="ulite-monai volume report",
    )


def write_volume_report(seg: Dataset, labels: np.ndarray, volume: SeriesVolume, segments: Sequence[SegmentInfo],
                        out_path: str | os.PathLike, algorithm_name: str, algorithm_version: str, **kwargs) -> Path:
    """Write :func:`build_volume_report` to ``out_path`` (temporary file + rename)."""
    sr = build_volume_report(seg, labels, volume, segments, algorithm_name, algorithm_version, **kwargs)
    save_atomically(sr.save_as, out_path)
    return Path(out_path)
