"""What the benchmarks record about the machine they ran on (docs/benchmarks.md asks for it)."""
from __future__ import annotations

import platform


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's processor string elsewhere)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def finish(setup: str, table: str, results, json_path: str | None) -> None:
    """A benchmark's last step: the CPU model and the run's setup, its table, and the raw
    results as JSON when asked (docs/benchmarks.md takes the table, the JSON keeps the rounds)."""
    import json
    import pathlib
    print(f"CPU: {cpu_model()}; {setup}")
    print(table)
    if json_path:
        pathlib.Path(json_path).write_text(json.dumps(results, indent=2))
