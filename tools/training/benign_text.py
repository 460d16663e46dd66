"""Pure text helpers for the benign half of the prompt-attack classifier corpus.

Everything here is a function of its arguments (and of the ``random.Random`` passed in), so the
corpus builder (``corpus_benign.py``) stays reproducible and these pieces can be unit-tested
without any downloaded package.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from html.parser import HTMLParser

SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s+")
_SPACES = re.compile(r"[ \t\u00a0]+")
_BLANK_LINES = re.compile(r"\n\s*\n+")
# Passage lengths, in characters, that a cut aims at: a prompt is as often one line as a page.
PASSAGE_TARGETS = (60, 120, 200, 350, 600, 1000, 1600)
MAX_CHARS = 2000


@dataclass(frozen=True)
class Record:
    text: str
    family: str
    source: str
    group: str
    license: str

    def as_json(self) -> dict:
        return {"text": self.text, "label": "benign", "family": self.family,
                "source": self.source, "group": self.group, "license": self.license}


def squash(text: str) -> str:
    """One line: all whitespace runs become one space."""
    return " ".join(text.split())


def tidy(text: str) -> str:
    """Keep line structure (code, e-mails) but drop trailing spaces and runs of blank lines."""
    lines = [_SPACES.sub(" ", l).rstrip() if not l.startswith((" ", "\t")) else l.rstrip()
             for l in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def clip(text: str, max_chars: int = MAX_CHARS) -> str:
    """At most ``max_chars``, cut at the last line or word break before the limit."""
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    for sep in ("\n", " "):
        cut = head.rfind(sep)
        if cut > max_chars // 2:
            return head[:cut].rstrip()
    return head


def cut_passages(text: str, rng: random.Random, targets=PASSAGE_TARGETS,
                 min_chars: int = 20, max_chars: int = MAX_CHARS) -> list[str]:
    """Cut running text into prompt-sized passages of varied length.

    Paragraphs (blank-line separated) are split into sentences; sentences are gathered until the
    passage reaches a length target drawn from ``targets``.  A passage never crosses a paragraph
    unless the paragraph itself is shorter than the target (short paragraphs are merged), and a
    run-on "sentence" longer than ``max_chars`` is cut at word boundaries.
    """
    out: list[str] = []
    target = rng.choice(targets)
    chunk: list[str] = []

    def flush():
        nonlocal chunk, target
        if chunk:
            out.append(" ".join(chunk))
        chunk = []
        target = rng.choice(targets)

    for para in _BLANK_LINES.split(text):
        words = para.split()
        if not words:
            continue
        for sentence in SENTENCE_END.split(" ".join(words)):
            while len(sentence) > max_chars:
                piece = clip(sentence, max_chars)
                flush()
                out.append(piece)
                sentence = sentence[len(piece):].lstrip()
            if chunk and len(" ".join(chunk)) + len(sentence) + 1 > max_chars:
                flush()
            chunk.append(sentence)
            if len(" ".join(chunk)) >= target:
                flush()
        if chunk and len(" ".join(chunk)) >= min(targets):
            flush()
    flush()
    return [p for p in out if len(p) >= min_chars]


def dedup(records: list[Record]) -> list[Record]:
    """Drop records whose exact text was already seen (the first one wins)."""
    seen: set[str] = set()
    out = []
    for r in records:
        if r.text not in seen:
            seen.add(r.text)
            out.append(r)
    return out


def cap_groups(records: list[Record], max_fraction: float, rng: random.Random) -> list[Record]:
    """Subsample any group holding more than ``max_fraction`` of the final total.

    The cap is solved for the total after capping (groups over the cap are cut to exactly the cap
    ``c`` with ``c = max_fraction * (rest + k * c)``), so no group ends above the fraction.
    """
    by_group: dict[str, list[Record]] = {}
    for r in records:
        by_group.setdefault(r.group, []).append(r)
    sizes = sorted(len(v) for v in by_group.values())
    capped = 0
    cap = None
    # Try capping the k largest groups, k = 1..n, until the cap sits between group sizes.
    for k in range(1, len(sizes) + 1):
        rest = sum(sizes[:-k]) if k < len(sizes) else 0
        denom = 1 - max_fraction * k
        if denom <= 0:
            break
        c = int(max_fraction * rest / denom)
        below = sizes[-k - 1] if k < len(sizes) else 0
        if c >= below:
            cap, capped = c, k
            break
    if cap is None or sizes[-1] <= cap:
        return list(records)
    keep: set[int] = set()
    for group, rows in by_group.items():
        if len(rows) > cap:
            keep.update(id(r) for r in rng.sample(rows, cap))
        else:
            keep.update(id(r) for r in rows)
    return [r for r in records if id(r) in keep]


# A handful of very frequent English function words: enough to tell English prose from
# other Latin-script languages (German, Spanish, Catalan...) that ASCII ratios cannot.
_ENGLISH_WORDS = frozenset(
    "the a an and or of to in on for with is are was were be been it this that these those you "
    "i we they he she my your our their what which who how why when where do does did not can "
    "will would should could have has had at by from as if but so about into than then there "
    "me him her them its all any some no yes please".split())
_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)


def looks_english(text: str) -> bool:
    """Heuristic: mostly ASCII letters and enough common English function words."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return True
    if sum(c.isascii() for c in letters) / len(letters) < 0.9:
        return False
    words = [w.lower() for w in _WORD.findall(text)]
    if len(words) < 4:
        return True
    return sum(w in _ENGLISH_WORDS for w in words) / len(words) >= 0.12


def utterance_from_pattern(pattern: str, rng: random.Random) -> str | None:
    """An AIML ``<pattern>`` (``WHAT IS YOUR NAME``) as something a user would type.

    Patterns with wildcards or markup are skipped (None).  Styles vary on purpose: chat users
    type lowercase without punctuation as often as proper sentences.
    """
    if any(ch in pattern for ch in "*_<>#^$") or not pattern.strip():
        return None
    text = squash(pattern).lower()
    text = re.sub(r"\bi\b", "I", text)
    question = re.match(r"(what|who|where|when|why|how|do|does|did|are|is|can|could|would|will|"
                        r"have|has|should|may|which|whats|am)\b", text)
    style = rng.random()
    if style < 0.35:
        return text
    text = text[0].upper() + text[1:]
    if style < 0.85:
        return text + ("?" if question else rng.choice([".", "", "!"]))
    return text + ("??" if question else "!")


class _TextBlocks(HTMLParser):
    """Collect the text of paragraph-like and preformatted HTML elements, in document order."""

    BLOCKS = {"p", "li", "dd", "dt", "td", "pre", "h1", "h2", "h3", "h4", "title"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.blocks: list[tuple[str, str]] = []
        self._stack: list[str] = []
        self._buf: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in self.BLOCKS:
            self._flush()
            self._stack.append(tag)
        elif tag == "br":
            self._buf.append("\n")

    def handle_endtag(self, tag):
        if tag in self.BLOCKS and tag in self._stack:
            self._flush()
            while self._stack and self._stack.pop() != tag:
                pass

    def handle_data(self, data):
        if self._stack:
            self._buf.append(data)

    def _flush(self):
        text = "".join(self._buf)
        self._buf = []
        if not self._stack or not text.strip():
            return
        kind = self._stack[-1]
        self.blocks.append((kind, text.strip("\n") if kind == "pre" else squash(text)))


def html_blocks(html: str) -> list[tuple[str, str]]:
    """``(tag, text)`` for each paragraph-like block; ``pre`` keeps its lines."""
    parser = _TextBlocks()
    parser.feed(html)
    parser.close()
    return parser.blocks


def man_sections(rendered: str) -> list[tuple[str, str]]:
    """Split a man page rendered by ``groff -Tutf8`` into ``(SECTION, paragraph)`` pairs.

    Section headings are the unindented lines; paragraphs are indented blocks separated by blank
    lines, de-indented and joined into one line (SYNOPSIS/EXAMPLE blocks keep their lines).
    """
    out: list[tuple[str, str]] = []
    section = ""
    lines = rendered.splitlines()[1:-1]  # header and footer lines
    block: list[str] = []

    def flush():
        nonlocal block
        if block:
            indent = min(len(l) - len(l.lstrip()) for l in block if l.strip())
            body = [l[indent:] for l in block]
            keep_lines = re.search(r"SYNOP|EXAMPL|ÜBERSICHT|BEISPIEL|SYNTAX|EXEMPL|EJEMPL|ПРИМЕР|"
                                   r"ОБЗОР|書式|例", section)
            out.append((section, "\n".join(body) if keep_lines else squash(" ".join(body))))
        block = []

    for line in lines:
        if not line.strip():
            flush()
        elif not line.startswith((" ", "\t")):
            flush()
            section = line.strip()
        else:
            block.append(line.rstrip())
    flush()
    return out
