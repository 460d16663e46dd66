"""`bastion demo` runs end to end, shows verdicts and metrics, and stops what it started."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time


def run_demo(*args, send_sigint_after=None):
    proc = subprocess.Popen([sys.executable, "-m", "bastion", "demo", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if send_sigint_after is not None:
        time.sleep(send_sigint_after)
        proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = open(f"/proc/{pid}/status").read()
    return "State:\tZ" not in status


def check_output(code, out):
    assert code == 0, out
    final = out.split("=== final ===")[1]
    # Benign traffic is answered by the model; every malformed request is refused by the sidecar.
    rows = {tuple(line.split()[:2]): line.split() for line in final.splitlines()
            if line.startswith(("fashion-mnist", "text-classifier"))}
    header = next(l.split() for l in final.splitlines() if l.startswith("model"))
    allowed, blocked = header.index("allowed"), header.index("blocked")
    assert int(rows[("fashion-mnist", "benign")][allowed]) > 0
    assert int(rows[("text-classifier", "benign")][allowed]) > 0
    assert int(rows[("text-classifier", "attack")][blocked]) > 0  # the defenses act
    malformed = [r for k, r in rows.items() if k[1] == "malformed"]
    assert malformed, final
    invalid = header.index("invalid")
    assert all(r[2] == r[invalid] for r in malformed), final
    assert re.search(r"latency through bastion, fashion-mnist: p50 [\d.]+ ms", final)
    assert re.search(r'bastion_verdicts_total\{action="block",enforced="true"', out)
    assert "top reasons:" in out
    for pid in re.findall(r"(?:upstream|sidecar) pid (\d+)", out):
        assert not pid_alive(int(pid)), f"demo left process {pid} running"
    assert "stopped upstream and sidecar" in out


def test_demo_runs_for_a_duration():
    check_output(*run_demo("--duration", "6", "--rate", "40"))


def test_demo_stops_cleanly_on_ctrl_c():
    code, out = run_demo("--rate", "40", send_sigint_after=12)
    check_output(code, out)
