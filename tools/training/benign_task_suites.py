"""Benign user tasks from the data of evaluation suites in the ``inspect-evals`` wheel: long,
real-world writing requests with their source material (WritingBench), the instructions that
customer-simulator agents follow (tau2-bench: "You are playing the role of a customer ..."),
and everyday questions asked beside a user's stored memories (PersistBench). They are the
registers the classifier flagged when held out: instructions written by people who are not
attacking anything. Used by corpus_benign.py; none of them is garak, PyRIT or chatterbot."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

from benign_archives import PYPI, pypi_archive, read_zip, src, zip_members
from benign_text import Record, clip, looks_english, tidy

PACKAGE = "inspect-evals"
LICENSE = "MIT (inspect-evals wheel metadata)"
_CJK = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]")


def writingbench(raw: Path, rng: random.Random) -> list[Record]:
    """WritingBench queries: a task and, often, the document it is about (clipped)."""
    archive, version = pypi_archive(raw, PACKAGE), PYPI[PACKAGE]
    member = "inspect_evals/writingbench/benchmark_all.jsonl"
    out = []
    for i, line in enumerate(read_zip(archive, member).splitlines()):
        query = tidy(json.loads(line)["query"])
        family = "multilingual" if _CJK.search(query) or not looks_english(query) else "task"
        out.append(Record(clip(query), family, src(PACKAGE, version, member, i), "writingbench", LICENSE))
    return out


def _scenario_text(scenario) -> str:
    instructions = scenario.get("instructions") if isinstance(scenario, dict) else None
    if isinstance(instructions, str):
        return instructions
    if isinstance(instructions, dict):
        parts = [instructions.get(k) for k in ("reason_for_call", "known_info", "unknown_info",
                                               "task_instructions")]
        return "\n\n".join(p for p in parts if isinstance(p, str) and p.strip())
    return ""


def tau2_user_scenarios(raw: Path, rng: random.Random) -> list[Record]:
    """tau2-bench user-simulator instructions: role-play a customer with a goal and limits."""
    archive, version = pypi_archive(raw, PACKAGE), PYPI[PACKAGE]
    out = []
    for member in zip_members(archive, r"^inspect_evals/tau2/data/domains/[^/]+/tasks\.json$"):
        for i, task in enumerate(json.loads(read_zip(archive, member))):
            text = tidy(_scenario_text(task.get("user_scenario") or {}))
            if len(text) > 40:
                out.append(Record(clip(text), "hard_negative", src(PACKAGE, version, member, i),
                                  "tau2-user-scenarios", LICENSE))
    return out


def persistbench(raw: Path, rng: random.Random) -> list[Record]:
    """PersistBench questions; a third carry the user's memories before them, as an assistant
    with memory would send them."""
    archive, version = pypi_archive(raw, PACKAGE), PYPI[PACKAGE]
    out = []
    for member in zip_members(archive, r"^inspect_evals/persistbench/benchmark_samples/.+\.jsonl$"):
        for i, line in enumerate(read_zip(archive, member).splitlines()):
            row = json.loads(line)
            text = row["query"]
            if rng.random() < 0.33 and row.get("memories"):
                memories = "\n".join(f"- {m}" for m in row["memories"][:6])
                text = f"What you know about the user:\n{memories}\n\nUser: {text}"
            out.append(Record(clip(tidy(text)), "chat", src(PACKAGE, version, member, i),
                              "persistbench", LICENSE))
    return out


COLLECTORS = {"writingbench": writingbench, "tau2-user-scenarios": tau2_user_scenarios,
              "persistbench": persistbench}
