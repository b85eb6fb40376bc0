"""`report.csv` and `report.json`: one row per case, written atomically after every case.

Each finished case also leaves ``OUT/cases/<name>.json`` (its row, written after its mask), so
``--continue`` can tell finished cases from unfinished ones and a killed run loses no rows.
Rows carry only the case name as given (the input's file or folder name) and, for DICOM, the
SeriesInstanceUID that was segmented; never a patient, study or institution tag. CSV cells that a
spreadsheet would run as a formula (starting with ``=``, ``+``, ``-``, ``@``, tab or CR) get a
leading ``'`` (OWASP's CSV-injection rule); numbers are written as they are.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from plsynth.atomic import atomic_write_text

CASES_DIR = "cases"
COLUMNS = [
    "case",
    "input",
    "series_uid",
    "status",
    "error",
    "kind",
    "shape",
    "spacing_mm",
    "infection_ml",
    "lung_ml",
    "percent_involved",
    "left_infection_ml",
    "left_lung_ml",
    "left_percent_involved",
    "right_infection_ml",
    "right_lung_ml",
    "right_percent_involved",
    "infection_px",
    "lung_px",
    "left_infection_px",
    "left_lung_px",
    "right_infection_px",
    "right_lung_px",
    "agreement_dice",
    "review",
    "review_reason",
    "lung_backend",
    "engine",
    "provider",
    "seconds",
    "seconds_lungs",
    "seconds_network",
    "seconds_agreement",
    "mask",
    "dicom_seg",
    "input_sha256",
    "bundle_sha256",
    "versions",
]


def case_record_path(out_dir: Path, case: str) -> Path:
    return Path(out_dir) / CASES_DIR / f"{case}.json"


def write_case_record(out_dir: Path, row: dict) -> Path:
    return atomic_write_text(case_record_path(out_dir, row["case"]), json.dumps(row, indent=2) + "\n")


def read_case_record(out_dir: Path, case: str) -> dict | None:
    path = case_record_path(out_dir, case)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (bool, int, float)):
        return str(value)
    text = json.dumps(value, separators=(",", ":")) if isinstance(value, (list, tuple, dict)) else str(value)
    return "'" + text if text.startswith(FORMULA_START) else text


def write_reports(out_dir: Path, rows: list[dict], run: dict) -> tuple[Path, Path]:
    """Write ``report.csv`` (COLUMNS, one row per case) and ``report.json`` ({run, cases})."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(row.get(k)) for k in COLUMNS})
    out_dir = Path(out_dir)
    csv_path = atomic_write_text(out_dir / "report.csv", buffer.getvalue())
    summary = {
        "cases": len(rows),
        "ok": sum(r.get("status") == "ok" for r in rows),
        "failed": sum(r.get("status") == "failed" for r in rows),
        "review": sum(bool(r.get("review")) for r in rows),
    }
    json_path = atomic_write_text(
        out_dir / "report.json", json.dumps({"run": run, "summary": summary, "cases": rows}, indent=2) + "\n"
    )
    return csv_path, json_path
