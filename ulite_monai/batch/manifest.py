# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""The batch manifest: one JSON object per line, appended and fsync-ed row by row.

A row is only appended after the series' output files have been renamed into place, so a row
with status ``done`` always points at complete files. A process killed while appending leaves
at most one torn last line, which :meth:`Manifest.load` ignores (and the series is redone).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["Manifest", "STATUSES", "FINISHED", "read_rows"]

STATUSES = ("done", "empty", "skipped", "failed")
FINISHED = ("done", "empty")  # statuses a rerun does not redo (same model version, outputs present)



def read_rows(path: str | os.PathLike) -> tuple[list[dict], int]:
    """The rows (JSON objects with a ``key``) of a manifest file in file order, and how many lines were torn
    (not JSON: a write cut short by a crash); such lines are skipped."""
    rows, torn = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                torn += 1
                continue
            if isinstance(row, dict) and "key" in row:
                rows.append(row)
    return rows, torn

class Manifest:
    """Append-only JSON-lines manifest with "last row per key wins" reading.

    Args:
        path: the ``manifest.jsonl`` file (created on first append).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.rows: dict[str, dict] = {}
        self.torn_lines = 0
        self.load()

    def load(self) -> None:
        self.rows.clear()
        self.torn_lines = 0
        if not self.path.exists():
            return
        rows, self.torn_lines = read_rows(self.path)
        for row in rows:
            self.rows[row["key"]] = row

    def is_finished(self, key: str, model_version: str, root: Path) -> bool:
        """True when ``key`` is done/empty with ``model_version`` and all its outputs exist."""
        return self.row_finished(self.rows.get(key), model_version, root)

    @staticmethod
    def row_finished(row: dict | None, model_version: str, root: Path) -> bool:
        """True when ``row`` is done/empty with ``model_version`` and all its outputs exist."""
        if not row or row.get("status") not in FINISHED or row.get("model_version") != model_version:
            return False
        return all((root / p).is_file() for p in (row.get("outputs") or {}).values() if p)

    def append(self, row: dict[str, Any]) -> None:
        if row.get("status") not in STATUSES:
            raise ValueError(f"unknown manifest status {row.get('status')!r}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(row, sort_keys=False, default=str)
        # a torn last line (killed writer) must not glue onto the next row
        needs_newline = self.path.exists() and self.path.stat().st_size > 0 and not self._ends_with_newline()
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(("\n" if needs_newline else "") + line + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows[row["key"]] = row

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def same_as_last(self, row: dict) -> bool:
        """Whether ``row`` repeats the last row of its key (status and reason), e.g. a skip on a rerun."""
        last = self.rows.get(row["key"])
        return bool(last) and last.get("status") == row.get("status") and last.get("reason") == row.get("reason")
