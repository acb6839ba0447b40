# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Series selection rules (MONAI Deploy DICOMSeriesSelectorOperator JSON format)."""

from __future__ import annotations

import json

import pytest
from support.dicom import REPO
from pydicom.dataset import Dataset

from ulite_monai.io.dicom_series import DicomFrame, DicomSeries
from ulite_monai.io.series_selection import SeriesSelector, load_selection_rules


def _series(study="1.1", uid="1.1.1", modality="CT", n=20, iop=(1, 0, 0, 0, 1, 0), **attrs) -> DicomSeries:
    h = Dataset()
    h.Modality = modality
    h.StudyInstanceUID, h.SeriesInstanceUID = study, uid
    h.ImageOrientationPatient = list(iop)
    h.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    h.SliceThickness = 2.5
    h.SeriesDescription = "Abdomen 2.5mm"
    h.PatientPosition = "HFS"
    for k, v in attrs.items():
        setattr(h, k, v)
    s = DicomSeries(study, uid, "1.2.840.10008.5.1.4.1.1.2", h)
    s.frames = [DicomFrame("f", f"{uid}.{i}", None, None, None, (1.0, 1.0)) for i in range(n)]
    return s


def _uids(rules, series, **kw):
    selected, why = SeriesSelector(rules, **kw).select(series)
    by_key = {s.key: s.series_uid for s in series}  # reasons are keyed by study + series
    return [s.series.series_uid for s in selected], {by_key[k]: v for k, v in why.items()}


def test_default_rules_take_ct_and_mr_with_enough_slices():
    rules = load_selection_rules(REPO / "configs" / "series_selection.json")
    series = [
        _series(uid="ct"),
        _series(uid="mr", modality="MR"),
        _series(uid="few", n=3),
        _series(uid="us", modality="US"),
        _series(uid="pt", modality="PT"),
    ]
    uids, why = _uids(rules, series)
    assert uids == ["ct", "mr"]
    assert "NumberOfSeriesRelatedInstances=3" in why["few"] and "Modality='US'" in why["us"]


def test_matching_semantics():
    s = [
        _series(uid="a"),
        _series(uid="b", SliceThickness=5.0, ImageType=["DERIVED", "SECONDARY"]),
        _series(uid="c", iop=(0, 1, 0, 0, 0, -1)),
    ]

    def sel(cond, **kw):
        return _uids({"selections": [{"name": "x", "conditions": cond}]}, s, **kw)[0]

    assert sel({"Modality": "ct"}) == ["a", "b", "c"]  # case-insensitive equality
    assert sel({"SeriesDescription": "abdomen"}) == ["a", "b", "c"]  # regex search
    assert sel({"SeriesDescription": "^chest"}) == []
    assert sel({"SliceThickness": [3, ">"]}) == ["b"]
    assert sel({"SliceThickness": [2, 3]}) == ["a", "c"]  # inclusive range
    assert sel({"SliceThickness": 5}) == ["b"]
    assert sel({"SliceThickness": "2\\.5"}) == ["a", "c"]  # regex on the number's text
    assert sel({"ImageType": ["PRIMARY", "!SECONDARY"]}) == ["a", "c"]
    assert sel({"ImageType": "!PRIMARY"}) == ["b"]
    assert sel({"ImageOrientationPatient": "Axial"}) == ["a", "b"]
    assert sel({"ImageOrientationPatient": "sagittal"}) == ["c"]
    assert sel({"BodyPartExamined": "ABDOMEN"}) == []  # missing attribute never matches
    assert sel({"Modality": "CT", "SeriesDescription": None}) == ["a", "b", "c"]  # falsy condition ignored
    assert sel({"Modality": "CT"}, all_matched=False) == ["a"]  # MONAI Deploy default: first match
    with pytest.raises(ValueError, match="operator"):
        sel({"SliceThickness": [3, "=>"]})


def test_first_match_per_study_and_sorting():
    series = [_series("s1", "a", n=10), _series("s1", "b", n=30), _series("s2", "c", n=5)]
    rules = {"selections": [{"name": "ct", "conditions": {"Modality": "CT"}}]}
    assert _uids(rules, series, all_matched=False)[0] == ["a", "c"]
    assert _uids(rules, series, all_matched=False, sort_by_sop_instance_count=True)[0] == ["b", "c"]
    assert _uids(None, series)[0] == ["a", "b", "c"]  # no rules: everything


def test_bad_rules_file_names_the_file(tmp_path):
    p = tmp_path / "rules.json"
    p.write_text(json.dumps({"selection": []}))
    with pytest.raises(ValueError, match="rules.json"):
        load_selection_rules(p)
    p.write_text("{not json")
    with pytest.raises(ValueError, match="cannot be read"):
        load_selection_rules(p)
