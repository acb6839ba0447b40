# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Series selection rules in the JSON format of MONAI Deploy's DICOMSeriesSelectorOperator.

Format::

    {"selections": [
        {"name": "CT", "conditions": {"Modality": "(?i)^CT$", "NumberOfSeriesRelatedInstances": [16, ">="]}},
        {"name": "MR axial", "conditions": {"Modality": "MR", "ImageOrientationPatient": "Axial",
                                             "ImageType": ["PRIMARY", "!LOCALIZER"]}}
    ]}

Conditions are DICOM keywords looked up in the series' first header (study, series and instance
attributes alike). Matching follows the MONAI Deploy semantics:

* a falsy condition value is ignored; a missing attribute never matches;
* text attributes: case-insensitive equality, otherwise a case-insensitive ``re.search``;
* numbers: exact value, ``[min, max]`` inclusive range, ``[value, op]`` with op in
  ``> >= < <= !=``, or a regular expression ``re.fullmatch``-ed against ``str(value)``;
* multi-valued attributes (e.g. ImageType): a term or list of terms that must all occur
  (case-insensitive substring of the value list), ``!term`` for terms that must not occur;
* ``ImageOrientationPatient``: "Axial", "Coronal" or "Sagittal", the dominant axis of the
  slice normal (computed in patient coordinates; unlike MONAI Deploy, PatientPosition is not
  required because the normal does not depend on it).

Project additions, all optional: ``NumberOfSeriesRelatedInstances`` (a standard DICOM keyword)
is filled from discovery with the number of image planes (frames) of the series when the
header lacks it; the top-level keys ``all_matched`` (default True here: every matching series
of a study is processed, not only the first) and ``sort_by_sop_instance_count`` mirror the
operator's constructor arguments.
"""

from __future__ import annotations

import json
import numbers
import os
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

from ulite_monai.io.dicom_series import DicomSeries

__all__ = ["SeriesSelector", "SelectedSeries", "load_selection_rules"]


def load_selection_rules(path: str | os.PathLike) -> dict:
    """Read and check a rules file; raises ValueError naming the file when it is malformed."""
    try:
        with open(path, encoding="utf-8") as f:
            rules = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"series selection rules {path}: cannot be read as JSON ({e})") from e
    _check_rules(rules, str(path))
    return rules


def _check_rules(rules: Any, where: str) -> None:
    if not isinstance(rules, dict) or not isinstance(rules.get("selections"), list) or not rules["selections"]:
        raise ValueError(
            f'series selection rules {where}: expected {{"selections": [{{"name": ..., "conditions": {{...}}}}]}}'
        )
    for i, sel in enumerate(rules["selections"]):
        if not isinstance(sel, dict) or not isinstance(sel.get("conditions", {}), dict):
            raise ValueError(
                f"series selection rules {where}: selection {i} must be an object with a 'conditions' object"
            )


@dataclass
class SelectedSeries:
    selection_name: str
    series: DicomSeries


def _attribute(series: DicomSeries, keyword: str) -> Any:
    if keyword == "NumberOfSeriesRelatedInstances" and keyword not in series.header:
        return series.num_slices
    elem = series.header.get(keyword)
    if elem is None or elem == "":
        return None
    if isinstance(elem, MultiValue) or isinstance(elem, (list, tuple)):
        return [str(v) for v in elem]
    if isinstance(elem, PersonName):
        return str(elem)
    if isinstance(elem, bool):
        return elem
    if isinstance(elem, numbers.Integral):
        return int(elem)
    if isinstance(elem, numbers.Real):
        return float(elem)
    return str(elem) if not hasattr(elem, "value") else elem.value


def _match_number(cond: Any, value: float) -> bool:
    if isinstance(cond, list):
        if len(cond) == 2 and isinstance(cond[1], str):
            ref, op = float(cond[0]), cond[1].strip()
            ops = {">": value > ref, ">=": value >= ref, "<": value < ref, "<=": value <= ref, "!=": value != ref}
            if op not in ops:
                raise ValueError(f"unsupported relational operator {op!r}; use one of {sorted(ops)}")
            return ops[op]
        if len(cond) == 2 and all(isinstance(c, numbers.Real) for c in cond):
            return float(cond[0]) <= value <= float(cond[1])
        raise ValueError(f"unsupported numeric condition {cond!r}; use a number, [min, max], [value, op] or a regex")
    if isinstance(cond, str):
        return re.fullmatch(cond, str(value)) is not None
    if isinstance(cond, numbers.Real):
        return float(cond) == value
    raise ValueError(f"unsupported numeric condition {cond!r}")


def _match_list(cond: Any, values: Sequence[str]) -> bool:
    text = str([str(v) for v in values]).lower()
    terms = cond if isinstance(cond, list) else [cond]
    for term in (str(t).lower() for t in terms):
        if term.startswith("!"):
            if term[1:] in text:
                return False
        elif term not in text:
            return False
    return True


def _orientation_name(iop: Sequence[str]) -> str:
    v = np.asarray([float(x) for x in iop], dtype=np.float64)
    normal = np.cross(v[:3], v[3:])
    return ("Sagittal", "Coronal", "Axial")[int(np.argmax(np.abs(normal)))]


def match_condition(series: DicomSeries, keyword: str, cond: Any) -> tuple[bool, str]:
    """Whether one condition matches; returns (matched, explanation if not)."""
    if not cond and cond != 0:
        return True, ""
    value = _attribute(series, keyword)
    if value is None or value == [] or value == "":
        return False, f"{keyword} missing"
    if keyword == "ImageOrientationPatient":
        want = str(cond).strip().capitalize()
        if want not in ("Axial", "Coronal", "Sagittal"):
            raise ValueError(f"ImageOrientationPatient condition must be Axial, Coronal or Sagittal, got {cond!r}")
        got = _orientation_name(value)
        return got == want, f"orientation {got} != {want}"
    if isinstance(value, bool):
        return bool(cond) == value, f"{keyword}={value}"
    if isinstance(value, (int, float)):
        return _match_number(cond, float(value)), f"{keyword}={value} does not match {cond!r}"
    if isinstance(value, list):
        return _match_list(cond, value), f"{keyword}={value} does not match {cond!r}"
    text = str(value)
    if isinstance(cond, str):
        ok = text.casefold() == cond.casefold() or re.search(cond, text, re.IGNORECASE) is not None
    elif isinstance(cond, list):
        ok = _match_list(cond, [text])
    else:
        ok = text == str(cond)
    return ok, f"{keyword}={text!r} does not match {cond!r}"


class SeriesSelector:
    """Apply selection rules per study.

    Args:
        rules: the parsed rules (``{"selections": [...]}``); None selects every series.
        all_matched: keep every matching series of a study (default from the rules, else True);
            False keeps the first match per selection, as MONAI Deploy's default.
        sort_by_sop_instance_count: order matches of a selection by decreasing plane count.
    """

    def __init__(
        self, rules: dict | None, all_matched: bool | None = None, sort_by_sop_instance_count: bool | None = None
    ) -> None:
        if rules is not None:
            _check_rules(rules, "(given)")
        self.rules = rules
        r = rules or {}
        self.all_matched = bool(r.get("all_matched", True)) if all_matched is None else all_matched
        self.sort = (
            bool(r.get("sort_by_sop_instance_count", False))
            if sort_by_sop_instance_count is None
            else sort_by_sop_instance_count
        )

    def select(self, series: Sequence[DicomSeries]) -> tuple[list[SelectedSeries], dict[str, str]]:
        """Returns the selected series (study order kept) and, for the others, why they were not selected
        (keyed by :attr:`DicomSeries.key`, study and series UID: one series UID may occur in two studies)."""
        if self.rules is None:
            return [SelectedSeries("", s) for s in series], {}
        studies: dict[str, list[DicomSeries]] = {}
        for s in series:
            studies.setdefault(s.study_uid, []).append(s)
        chosen: dict[str, SelectedSeries] = {}
        why: dict[str, list[str]] = {s.key: [] for s in series}
        for members in studies.values():
            for sel in self.rules["selections"]:
                name = str(sel.get("name", "")).strip()
                conditions = sel.get("conditions") or {}
                if not conditions:
                    continue
                found = []
                for s in members:
                    ok, reason = True, ""
                    for key, cond in conditions.items():
                        ok, reason = match_condition(s, key, cond)
                        if not ok:
                            break
                    if ok:
                        found.append(s)
                        if not self.all_matched and not self.sort:
                            break
                    else:
                        why[s.key].append(f"{name or 'selection'}: {reason}")
                if self.sort:
                    found.sort(key=lambda x: x.num_slices, reverse=True)
                if not self.all_matched:
                    found = found[:1]
                for s in found:
                    chosen.setdefault(s.key, SelectedSeries(name, s))
        selected = [chosen[s.key] for s in series if s.key in chosen]
        rejected = {
            key: "no selection rule matched (" + "; ".join(reasons[:3]) + ")" if reasons else "not the first match"
            for key, reasons in why.items()
            if key not in chosen
        }
        return selected, rejected
