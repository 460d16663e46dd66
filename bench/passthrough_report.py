"""bench/passthrough.py's numbers into its report: per-cell summaries over rounds, the ratios
(bastion vs the bare proxy and the direct call; bastion vs bastion_baseline, another commit in
the same run, paired by round) and the markdown table docs/benchmarks.md takes."""
from __future__ import annotations

def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, int(round(q * len(sorted_values) + 0.5)) - 1))
    return sorted_values[index]


def summarize(raw: dict, targets: list[str], cells: list[tuple[int, int]]) -> dict:
    rows = []
    for payload, in_flight in cells:
        for target in targets:
            runs = raw[(target, payload, in_flight)]
            lat = sorted(x for run in runs for x in run["latencies"])
            n = len(lat)
            elapsed = sum(run["elapsed"] for run in runs)
            per_round = [len(run["latencies"]) / run["elapsed"] for run in runs]
            has_proxy = runs[0]["has_proxy"]
            rows.append({
                "target": target, "payload_bytes": payload, "in_flight": in_flight,
                "requests": n, "errors": sum(run["errors"] for run in runs),
                "seconds": elapsed,
                "throughput_rps": n / elapsed if elapsed else 0.0,
                "throughput_rps_rounds": per_round,
                "p50_ms": percentile(lat, 0.50) * 1e3,
                "p99_ms": percentile(lat, 0.99) * 1e3,
                "mean_ms": (sum(lat) / n * 1e3) if n else float("nan"),
                "proxy_cpu_us_per_req": (sum(run["proxy_cpu"] for run in runs) / n * 1e6
                                         if has_proxy and n else None),
                "proxy_cpu_us_per_req_rounds": [
                    run["proxy_cpu"] / len(run["latencies"]) * 1e6 if run["latencies"] else None
                    for run in runs] if has_proxy else None,
                "upstream_cpu_us_per_req": sum(run["upstream_cpu"] for run in runs) / n * 1e6
                if n else None,
                "client_cpu_us_per_req": sum(run["client_cpu"] for run in runs) / n * 1e6
                if n else None,
                "background_cores": sum(run["background_cores"] * run["elapsed"]
                                        for run in runs) / elapsed if elapsed else None,
            })
    return {"rows": rows, "ratios": ratios(rows)}


def ratios(rows: list[dict]) -> list[dict]:
    index = {(r["target"], r["payload_bytes"], r["in_flight"]): r for r in rows}
    out = []
    for (target, payload, in_flight), row in index.items():
        if target == "direct":
            continue
        bare = index.get(("bare_proxy", payload, in_flight))
        direct = index.get(("direct", payload, in_flight))
        entry = {"target": target, "payload_bytes": payload, "in_flight": in_flight}
        if (target != "bare_proxy" and bare and bare["proxy_cpu_us_per_req"]
                and row["proxy_cpu_us_per_req"] is not None):
            entry["cpu_per_req_vs_bare"] = (row["proxy_cpu_us_per_req"]
                                            / bare["proxy_cpu_us_per_req"])
            # Paired by round: the two windows of a round ran back to back.
            entry["cpu_per_req_vs_bare_rounds"] = [
                a / b for a, b in zip(row.get("proxy_cpu_us_per_req_rounds") or [],
                                      bare.get("proxy_cpu_us_per_req_rounds") or []) if a and b]
        baseline = index.get(("bastion_baseline", payload, in_flight))
        if (target == "bastion" and baseline and baseline["proxy_cpu_us_per_req"]
                and row["proxy_cpu_us_per_req"] is not None):
            entry["cpu_per_req_vs_baseline"] = (row["proxy_cpu_us_per_req"]
                                                / baseline["proxy_cpu_us_per_req"])
            entry["cpu_per_req_vs_baseline_rounds"] = [
                a / b for a, b in zip(row.get("proxy_cpu_us_per_req_rounds") or [],
                                      baseline.get("proxy_cpu_us_per_req_rounds") or [])
                if a and b]
        if direct and direct["throughput_rps"]:
            entry["throughput_vs_direct"] = row["throughput_rps"] / direct["throughput_rps"]
            entry["throughput_vs_direct_rounds"] = [
                a / b for a, b in zip(row["throughput_rps_rounds"],
                                      direct["throughput_rps_rounds"]) if b]
        out.append(entry)
    return out


# ---- report -----------------------------------------------------------------------------------
def fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def spread(values) -> str:
    return f"{min(values):.2f}–{max(values):.2f}" if values else "–"


def size(payload: int) -> str:
    return f"{payload // 1024} KiB"


def markdown(result: dict) -> str:
    lines = ["| payload | in flight | target | req/s | req/s per round | p50 ms | p99 ms "
             "| proxy CPU µs/req | upstream CPU µs/req | client CPU µs/req | background cores |",
             "|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        rounds = " / ".join(f"{x:.0f}" for x in r["throughput_rps_rounds"])
        err = f" ({r['errors']} errors)" if r["errors"] else ""
        lines.append(
            f"| {size(r['payload_bytes'])} | {r['in_flight']} | {r['target']}{err} "
            f"| {r['throughput_rps']:.0f} | {rounds} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} "
            f"| {fmt(r['proxy_cpu_us_per_req'], '.0f')} "
            f"| {fmt(r['upstream_cpu_us_per_req'], '.0f')} "
            f"| {fmt(r['client_cpu_us_per_req'], '.0f')} "
            f"| {fmt(r['background_cores'], '.2f')} |")
    lines += ["", "| target | payload | in flight | proxy CPU/req vs bare_proxy (target ≤ 1.2×) "
              "| per-round range | req/s vs direct (target ≥ 0.6× at 16 in flight) "
              "| per-round range |", "|---|---|---:|---:|---:|---:|---:|"]
    order = {"bastion": 0, "bare_proxy": 1, "nginx": 2}
    for e in sorted(result["ratios"], key=lambda e: (order.get(e["target"], 3), e["target"],
                                                     e["payload_bytes"], e["in_flight"])):
        cpu = e.get("cpu_per_req_vs_bare")
        tput = e.get("throughput_vs_direct")
        cpu_s = "–" if cpu is None else f"{cpu:.2f}×" + (
            (" ✅" if cpu <= 1.2 else " ❌") if e["target"] == "bastion" else "")
        tput_s = "–" if tput is None else f"{tput:.2f}×" + (
            (" ✅" if tput >= 0.6 else " ❌") if e["target"] == "bastion"
            and e["in_flight"] == 16 else "")
        lines.append(f"| {e['target']} | {size(e['payload_bytes'])} | {e['in_flight']} "
                     f"| {cpu_s} | {spread(e.get('cpu_per_req_vs_bare_rounds'))} "
                     f"| {tput_s} | {spread(e.get('throughput_vs_direct_rounds'))} |")
    versus = [e for e in result["ratios"] if "cpu_per_req_vs_baseline" in e]
    if versus:
        lines += ["", "| payload | in flight | bastion proxy CPU/req vs bastion_baseline "
                  "(this commit / the older one; target ≤ 1.0×) | per-round range |",
                  "|---|---:|---:|---:|"]
        for e in sorted(versus, key=lambda e: (e["payload_bytes"], e["in_flight"])):
            lines.append(f"| {size(e['payload_bytes'])} | {e['in_flight']} "
                         f"| {e['cpu_per_req_vs_baseline']:.2f}× "
                         f"| {spread(e.get('cpu_per_req_vs_baseline_rounds'))} |")
    return "\n".join(lines)
