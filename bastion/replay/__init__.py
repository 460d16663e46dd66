"""`bastion replay`: send a labelled corpus through a sidecar (or its pipeline, in-process) and
report how well the defenses separate attack from benign traffic; usable as a CI gate.

Online (a running sidecar)::

    bastion replay --target 127.0.0.1:8001 --model text-classifier --data prompts.jsonl \\
        [--admin 127.0.0.1:8002 | --config bastion.yaml] [--concurrency 8] [--rate 50] \\
        [--timeout 10] [--out replay-report] [--fpr 0.01] [--limit N --seed S] \\
        [--fail-under "tpr:adv_suffix>=0.99 fpr<=0.01 errors<=0"]

Offline (the model's configured pipeline run in-process: same stages, same policy, no server)::

    bastion replay --offline -c bastion.yaml --model text-classifier --data prompts.jsonl

A record counts as *detected* when the sidecar's verdict is flag, throttle or block (the
response annotations of monitor mode, or of enforce mode for non-allow verdicts), or when the
call was refused with PERMISSION_DENIED / RESOURCE_EXHAUSTED (enforce mode). Any other failure
(INVALID_ARGUMENT, UNAVAILABLE, DEADLINE_EXCEEDED, ...) is an *error*: counted by status code
and left out of the detection rates. Per-stage numbers come from the ``bastion.score.<stage>``
annotations, so they need monitor mode (enforce mode annotates only non-allow responses).

Outputs in ``--out``: report.json (machine), report.md (tables, links to the plots),
roc.png and hist-<stage>.png (matplotlib), records.jsonl (one line per record: id, family,
status, verdict, scores; never the text).

Exit status: 0 all gates met, 3 a gate is unmet, 2 bad usage / data / config / gate, 1 the
replay could not run (target unreachable).

Top-level imports stay light: ``bastion serve`` imports this package to build its command line.

Modules: ``outcome`` (one record's result, exit codes), ``online`` (a running sidecar over gRPC),
``offline`` (the configured pipeline in-process), ``thresholds`` (stage thresholds from a config
or /metrics), ``metrics`` (the report's numbers), ``gates`` (``--fail-under``), ``plots`` (PNGs),
``render`` (report.md and the terminal summary), ``command`` (the command line and the run).
"""
from __future__ import annotations

from bastion.replay.command import add_parser, main
from bastion.replay.gates import parse_gates
from bastion.replay.metrics import auroc, operating_point
from bastion.replay.offline import OfflinePipeline

__all__ = ["OfflinePipeline", "add_parser", "auroc", "main", "operating_point", "parse_gates"]
