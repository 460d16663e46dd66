"""The image attack suite's smoke configuration, as CI runs it: every attack (white-box, the
black-box Square through the sidecar, the adaptive one) on a few images, end to end through
real `bastion upstream` + `bastion serve` processes with the shipped image profile."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from tests.harness import REPO


def test_smoke_run_covers_every_attack_through_both_endpoints(tmp_path):
    out = tmp_path / "smoke.json"
    result = subprocess.run([sys.executable, "tools/eval_image_defense.py", "--smoke",
                             "--json", str(out), "--cache", str(tmp_path / "cache")],
                            cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    numbers = json.loads(out.read_text())
    sys.path.insert(0, str(REPO / "tools"))
    import image_attacks
    expected = {a.name for a in image_attacks.ATTACKS} | {
        "Square Linf 0.1 (black-box)", "Adaptive PGD Linf 0.1 (model + detectors)"}
    for name in ("undefended", "profile"):
        endpoint = numbers["endpoints"][name]
        assert set(endpoint["attacks"]) == expected
        for row in endpoint["attacks"].values():
            assert 0.0 <= row["success"] <= 1.0 and 0.0 <= row["refused"] <= 1.0
            assert row["success"] + row["refused"] <= 1.0 + 1e-9
        # CPU comes from /proc tick counters (10 ms): a few images through the bare upstream
        # may read 0 on a loaded machine; the sidecar's profile work never does.
        assert np.isfinite(endpoint["cpu_ms_per_image"]) and endpoint["cpu_ms_per_image"] >= 0
    assert numbers["endpoints"]["profile"]["cpu_ms_per_image"] > 0
    # the upstream alone refuses nothing; the sidecar answers most clean images
    assert numbers["endpoints"]["undefended"]["clean_refused"] == 0.0
    assert numbers["endpoints"]["undefended"]["attacks"]["PGD Linf 0.1"]["refused"] == 0.0
    assert numbers["endpoints"]["profile"]["clean_refused"] <= 0.5
    square = numbers["endpoints"]["profile"]["attacks"]["Square Linf 0.1 (black-box)"]
    assert square["queries_per_image"] >= 1  # the black-box attack really queried the sidecar
    assert set(numbers["thresholds"]) == {"ensemble", "margin", "gaps"}
    # PGD at eps 0.1 fools the undefended model on (nearly) every image; the profile refuses most
    undefended = numbers["endpoints"]["undefended"]["attacks"]["PGD Linf 0.1"]["success"]
    assert undefended >= 0.5
    assert numbers["endpoints"]["profile"]["attacks"]["PGD Linf 0.1"]["refused"] >= 0.5
    assert "| attack |" in result.stdout  # the report is rendered (no doc written in smoke)
    assert np.isfinite(numbers["detection"]["PGD Linf 0.1"]["auroc:ensemble"])
