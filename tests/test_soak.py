"""The soak benchmark (bench/soak.py), shortened to 60 s for CI: mixed benign, attack and
malformed traffic from thousands of client ids through `bastion serve` with the demo pipelines;
no unexpected status, no RSS growth of 10% or more after warm-up, no fd growth, clean exit."""
from __future__ import annotations

import re
import subprocess
import sys

from tests.harness import REPO

DURATION_S = 60


def status_table(report: str) -> dict[str, dict[str, int]]:
    """{traffic label: {"sent": n, STATUS: n, ...}} from the report's status table."""
    lines = [line for line in report.splitlines() if line.startswith("| ")]
    header = next(line for line in lines if line.startswith("| traffic |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    table = {}
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] in ("benign", "attack", "malformed"):
            table[cells[0]] = {col: int(cell) for col, cell in zip(columns[1:], cells[1:])}
    return table


def test_soak_60s():
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "soak.py"), "--duration", str(DURATION_S),
         "--concurrency", "8", "--clients", "2000", "--sample-every", "2", "--warmup", "15"],
        capture_output=True, text=True, timeout=DURATION_S + 180, cwd=str(REPO))
    report = proc.stdout
    assert proc.returncode == 0, f"{report[-6000:]}\n{proc.stderr[-3000:]}"
    assert "**PASS**" in report
    # The traffic really was mixed, and each kind got its answer.
    table = status_table(report)
    assert table["benign"]["OK"] > 0, report
    assert table["attack"]["PERMISSION_DENIED"] > 0, report
    assert table["malformed"]["INVALID_ARGUMENT"] == table["malformed"]["sent"] > 0, report
    rate = int(re.search(r"= \*\*(\d+) req/s\*\*", report).group(1))
    assert rate > 20, report  # a floor that only a stall (not a slow, shared machine) breaks
    assert "| t (s) | requests | sidecar RSS (MiB) |" in report
