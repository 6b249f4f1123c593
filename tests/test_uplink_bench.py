"""Smoke test of `make bench-uplink`: a small backlog drained end to end, every figure present and sane."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_uplink_drains_a_small_backlog_and_writes_its_figures(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    done = subprocess.run(
        [sys.executable, "-m", "gateway.bench.uplink", "--records", "4000", "--batch", "1000", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "drain rate (records/s)" in done.stdout and "bytes on the wire" in done.stdout
    figures = json.loads(out.read_text())["uplink"]
    assert figures["telemetry_records"] == 4000 and figures["duplicates"] == 0
    assert figures["records_per_s"] > 0 and 0 < figures["bytes_per_telemetry_record"] < 20
    assert figures["json_bytes_per_telemetry_record"] > figures["bytes_per_telemetry_record"]
