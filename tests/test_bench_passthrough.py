"""bench/passthrough.py's report: the old-vs-new ratio (bastion vs bastion_baseline, another
commit's sidecar in the same run) is computed per cell and paired by round."""
from __future__ import annotations

import importlib.util
import pathlib

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench" / "passthrough.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_passthrough", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(target, cpu_rounds, rps_rounds=(100.0, 100.0)):
    return {"target": target, "payload_bytes": 1024, "in_flight": 1, "requests": 10, "errors": 0,
            "seconds": 1.0, "throughput_rps": sum(rps_rounds) / len(rps_rounds),
            "throughput_rps_rounds": list(rps_rounds), "p50_ms": 1.0, "p99_ms": 2.0,
            "proxy_cpu_us_per_req": sum(cpu_rounds) / len(cpu_rounds) if cpu_rounds else None,
            "proxy_cpu_us_per_req_rounds": list(cpu_rounds) if cpu_rounds else None,
            "upstream_cpu_us_per_req": 50.0, "client_cpu_us_per_req": 20.0,
            "background_cores": 0.0}


def test_new_vs_baseline_ratio_is_paired_by_round_and_reported():
    bench = _bench()
    rows = [_row("direct", None), _row("bastion", [90.0, 110.0]),
            _row("bastion_baseline", [100.0, 100.0]), _row("bare_proxy", [50.0, 50.0])]
    ratios = bench.ratios(rows)
    (entry,) = [e for e in ratios if e["target"] == "bastion"]
    assert entry["cpu_per_req_vs_baseline"] == 1.0
    assert entry["cpu_per_req_vs_baseline_rounds"] == [0.9, 1.1]
    assert "cpu_per_req_vs_baseline" not in next(e for e in ratios
                                                  if e["target"] == "bastion_baseline")
    report = bench.markdown({"rows": rows, "ratios": ratios})
    assert "vs bastion_baseline" in report and "| 1 KiB | 1 | 1.00× | 0.90–1.10 |" in report


def test_no_baseline_no_old_vs_new_table():
    bench = _bench()
    rows = [_row("direct", None), _row("bastion", [90.0, 110.0]), _row("bare_proxy", [50.0, 50.0])]
    ratios = bench.ratios(rows)
    assert "vs bastion_baseline" not in bench.markdown({"rows": rows, "ratios": ratios})
