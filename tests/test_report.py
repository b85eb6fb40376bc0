"""report.csv: cells a spreadsheet would run as a formula are escaped; numbers are written as they are."""

from __future__ import annotations

import csv
from pathlib import Path

from plsynth.deploy.report import write_reports


def test_formula_cells_are_escaped_and_numbers_kept(tmp_path: Path):
    rows = [{"case": '=HYPERLINK("http://x")', "input": "+1.nii.gz", "status": "failed", "error": "@SUM(A1)",
             "review_reason": "-2+3", "infection_ml": -1.5, "lung_ml": 0, "shape": [1, 2, 3]}]
    write_reports(tmp_path, rows, {})
    with open(tmp_path / "report.csv", newline="") as handle:
        row = next(csv.DictReader(handle))
    assert row["case"] == "'=HYPERLINK(\"http://x\")" and row["input"] == "'+1.nii.gz"
    assert row["error"] == "'@SUM(A1)" and row["review_reason"] == "'-2+3"
    assert row["infection_ml"] == "-1.5" and row["lung_ml"] == "0" and row["shape"] == "[1,2,3]"
