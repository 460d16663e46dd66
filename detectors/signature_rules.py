"""Signature rules: known prompt-injection and jailbreak phrasings as regex rules loaded from
YAML and checked when loaded, and the windowed search of one rule over a text. The
``detect.signatures`` stage (:mod:`bastion.detectors.signatures`) runs them over a prompt and
its decodings (:mod:`bastion.detectors.signature_decoders`).

Rule files (the bundled one is ``bastion/data/signatures/default.yaml``)::

    version: 1
    macros:                      # optional: {{name}} in a pattern is replaced by the macro
      w: '[^\\W_]{1,24}'
    rules:
      - id: ignore_previous_instructions      # [a-z0-9_.-]+, unique
        family: instruction_override
        description: ...
        pattern: '\\bignore\\b ...'           # Python regex; or `literal: some text`
        keywords: [[ignore, disregard], [instruction, rule]]   # optional prefilter, see below
        not_after: '(?:n''t|\\bnot)\\W{1,3}$'  # optional: reject a match preceded by this
        ignore_case: true                     # default true: write the pattern in lower case
        weight: 1.0                           # 0 < weight <= 1, default 1.0
        examples:                             # optional, checked when the file is loaded
          match: ["..."]
          no_match: ["..."]

Matching: ``ignore_case`` rules are compiled without IGNORECASE and run on the lower-cased text
(sre is about 3x faster that way), so their patterns must be lower case (checked at load). A
leading ``\\b`` is checked outside sre, which then keeps its fast literal-prefix search.

Cost bounds (per text):

* ``keywords`` are a prefilter: literals (lower case for ignore_case rules), either one list
  (at least one must occur) or a list of lists (one of each list must occur). They must be
  necessary: every match contains them (the tests check this by generating matches). A rule
  runs only when its keywords occur in the text, which is a plain substring search; a rule
  without keywords always runs, a ``literal`` rule gets its literal as keyword.
* Every pattern must match at least 1 and at most ``MAX_MATCH_WIDTH`` characters (checked at
  load: bound every repeat, ``\\w{1,24}`` rather than ``\\w+``). Texts longer than ``WINDOW``
  characters are searched in windows that overlap by ``OVERLAP`` > ``MAX_MATCH_WIDTH``
  characters, so every match lies whole in some window: nothing is skipped, and a pattern's
  backtracking is confined to one window. Use linear patterns (disjoint classes around
  repeats, atomic groups or possessive quantifiers where in doubt).
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import re
from pathlib import Path
from typing import Any

import yaml

try:  # the regex parser, for the match-width check (private, stable since 3.11)
    from re import _parser as _sre_parse  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - Python < 3.11
    import sre_parse as _sre_parse  # type: ignore[no-redef]

__all__ = ["Rule", "load_rules", "parse_rules", "rule_matches", "keywords_present",
           "default_rules_path", "search_rule", "fold_case", "is_word_char", "match_width",
           "WINDOW", "OVERLAP", "MAX_MATCH_WIDTH"]

WINDOW = 8192
OVERLAP = 1024
MAX_MATCH_WIDTH = OVERLAP - 1

_ID_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
_MACRO_RE = re.compile(r"\{\{([A-Za-z_][A-Za-z0-9_]*)\}\}")


def default_rules_path() -> Path:
    return Path(str(importlib.resources.files("bastion") / "data" / "signatures" / "default.yaml"))


# --------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rule:
    id: str
    family: str
    description: str
    regex: re.Pattern
    #: Prefilter: every group must have a member occurring in the text (lower-cased for
    #: ignore_case rules, as written otherwise); empty = always run.
    keywords: tuple[tuple[str, ...], ...]
    weight: float
    #: True for ignore_case rules: ``regex`` is lower-case and runs on the folded text.
    folded: bool = True
    #: The pattern began with \b, which is checked outside sre (a leading \b defeats sre's
    #: literal-prefix search, which makes a rule several times slower).
    lead_boundary: bool = False
    #: Reject a match whose preceding text (up to 32 characters) matches this at its end.
    not_after: re.Pattern | None = None
    examples_match: tuple[str, ...] = ()
    examples_no_match: tuple[str, ...] = ()


# Case-insensitive rules are written in lower case and run, compiled without IGNORECASE
# (about 3x faster in sre), on the lower-cased text. The non-ASCII characters that IGNORECASE
# would equate with ASCII letters but lower() does not map to them are mapped first.
_PREFOLD = {0x130: "i", 0x131: "i", 0x17F: "s"}  # İ, dotless ı, long ſ (lower() maps K to k)


def fold_case(text: str) -> str:
    if not text.isascii() and ("\u0130" in text or "\u0131" in text or "\u017f" in text):
        text = text.translate(_PREFOLD)
    return text.lower()


def _uppercase_literals(pattern: str) -> list[str]:
    """Upper-case literal characters in a regex (which a folded text can never contain)."""
    found: list[str] = []
    literal_ops = (_sre_parse.LITERAL, _sre_parse.NOT_LITERAL)

    def walk(node: Any) -> None:
        if isinstance(node, _sre_parse.SubPattern):
            for item in node.data:
                walk(item)
        elif isinstance(node, (tuple, list)):
            if len(node) == 2 and node[0] is _sre_parse.IN:
                return  # an upper-case member of a set is merely dead, not wrong
            if (len(node) == 2 and node[0] in literal_ops and isinstance(node[1], int)
                    and chr(node[1]) != fold_case(chr(node[1]))):
                found.append(chr(node[1]))
                return
            for item in node:
                walk(item)

    walk(_sre_parse.parse(pattern, 0))
    return found


def match_width(pattern: str, flags: int) -> tuple[int, int]:
    return _sre_parse.parse(pattern, flags).getwidth()


def _as_str_list(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, list) or not all(isinstance(v, str)
                                                                        for v in value):
        raise ValueError(f"{what} must be a list of strings")
    return tuple(value)


def _parse_keywords(value: Any, where: str, ignore_case: bool) -> tuple[tuple[str, ...], ...]:
    """``[a, b]`` (one any-of group) or ``[[a, b], [c, d]]`` (all groups must be present)."""
    if value is None or value == []:
        return ()
    if not isinstance(value, list):
        raise ValueError(f"{where}: keywords must be a list")
    groups = value if all(isinstance(v, list) for v in value) else [value]
    out = []
    for group in groups:
        words = _as_str_list(group, f"{where}: keywords")
        if not words or any(not w for w in words):
            raise ValueError(f"{where}: keywords must be non-empty strings")
        out.append(tuple(fold_case(w) if ignore_case else w for w in words))
    return tuple(out)


def keywords_present(rule: Rule, text: str) -> bool:
    """Whether ``text`` passes the rule's keyword prefilter."""
    target = fold_case(text) if rule.folded else text
    return all(any(k in target for k in group) for group in rule.keywords)


def _parse_rule(entry: Any, index: int, macros: dict[str, str], seen: set[str]) -> Rule:
    where = f"rule {index}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: must be a mapping")
    known = {"id", "family", "description", "pattern", "literal", "keywords", "ignore_case",
             "weight", "examples", "not_after"}
    unknown = sorted(set(entry) - known)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}")
    rule_id = entry.get("id")
    if not isinstance(rule_id, str) or not _ID_RE.fullmatch(rule_id):
        raise ValueError(f"{where}: id must match {_ID_RE.pattern}")
    where = f"rule {index} ({rule_id})"
    if rule_id in seen:
        raise ValueError(f"{where}: duplicate id")
    seen.add(rule_id)
    family = entry.get("family")
    if not isinstance(family, str) or not family:
        raise ValueError(f"{where}: family must be a non-empty string")
    description = entry.get("description", "")
    if not isinstance(description, str):
        raise ValueError(f"{where}: description must be a string")
    ignore_case = entry.get("ignore_case", True)
    if not isinstance(ignore_case, bool):
        raise ValueError(f"{where}: ignore_case must be true or false")
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight <= 1:
        raise ValueError(f"{where}: weight must be a number in (0, 1]")
    pattern, literal = entry.get("pattern"), entry.get("literal")
    if (pattern is None) == (literal is None):
        raise ValueError(f"{where}: give exactly one of pattern and literal")

    def expand(match: re.Match) -> str:
        name = match.group(1)
        if name not in macros:
            raise ValueError(f"{where}: unknown macro {{{{{name}}}}}")
        return macros[name]

    keywords = _parse_keywords(entry.get("keywords"), where, ignore_case)
    if literal is not None:
        if not isinstance(literal, str) or not literal:
            raise ValueError(f"{where}: literal must be a non-empty string")
        pattern = re.escape(fold_case(literal) if ignore_case else literal)
        if not keywords:
            keywords = ((fold_case(literal) if ignore_case else literal,),)
    elif not isinstance(pattern, str) or not pattern:
        raise ValueError(f"{where}: pattern must be a non-empty string")
    else:
        pattern = _MACRO_RE.sub(expand, pattern)
    flags = 0
    try:
        regex = re.compile(pattern, flags)
    except re.error as err:
        raise ValueError(f"{where}: invalid pattern: {err}") from None
    lead_boundary = False
    first = _sre_parse.parse(pattern, flags).data[:1]
    if pattern.startswith("\\b") and first and first[0] == (_sre_parse.AT,
                                                                _sre_parse.AT_BOUNDARY):
        lead_boundary = True
        regex = re.compile(pattern[2:], flags)
    not_after = entry.get("not_after")
    if not_after is not None:
        if not isinstance(not_after, str) or not not_after:
            raise ValueError(f"{where}: not_after must be a non-empty regex string")
        try:
            not_after = re.compile(_MACRO_RE.sub(expand, not_after), flags)
        except re.error as err:
            raise ValueError(f"{where}: invalid not_after: {err}") from None
    if ignore_case:
        upper = _uppercase_literals(pattern)
        if upper:
            raise ValueError(f"{where}: ignore_case patterns must be written in lower case "
                             f"(found {''.join(sorted(set(upper)))!r})")
    low, high = match_width(pattern, flags)
    if low < 1:
        raise ValueError(f"{where}: pattern can match the empty string")
    if high > MAX_MATCH_WIDTH:
        raise ValueError(f"{where}: pattern can match more than {MAX_MATCH_WIDTH} characters; "
                         "bound every repeat (e.g. \\w{1,24} instead of \\w+)")
    examples = entry.get("examples") or {}
    if not isinstance(examples, dict) or set(examples) - {"match", "no_match"}:
        raise ValueError(f"{where}: examples must be a mapping with match / no_match lists")
    rule = Rule(rule_id, family, description, regex, keywords, float(weight), ignore_case,
                lead_boundary, not_after, _as_str_list(examples.get("match"), f"{where}: examples.match"),
                _as_str_list(examples.get("no_match"), f"{where}: examples.no_match"))
    # The rule's own examples are part of its contract: check them now, so a broken edit to a
    # rule file fails at config load, not silently in production.
    for number, example in enumerate(rule.examples_match):
        if not rule_matches(rule, example):
            raise ValueError(f"{where}: examples.match[{number}] does not match")
        if not keywords_present(rule, example):
            raise ValueError(f"{where}: examples.match[{number}] misses a keyword group")
    for number, example in enumerate(rule.examples_no_match):
        if rule_matches(rule, example):
            raise ValueError(f"{where}: examples.no_match[{number}] matches")
    return rule


def rule_matches(rule: Rule, text: str) -> bool:
    """Whether one rule matches ``text`` itself (no keyword prefilter, no decoding)."""
    return search_rule(rule, fold_case(text) if rule.folded else text)


def load_rules(source: str | Path | None = None) -> list[Rule]:
    """Parse and compile a rule file (default: the bundled one). Raises ValueError."""
    path = Path(source) if source is not None else default_rules_path()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ValueError(f"signature rules {str(path)!r}: cannot read: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"signature rules {str(path)!r}: not valid YAML: {err}") from None
    try:
        return parse_rules(data)
    except ValueError as err:
        raise ValueError(f"signature rules {str(path)!r}: {err}") from None


def parse_rules(data: Any) -> list[Rule]:
    if isinstance(data, list):
        data = {"rules": data}
    if not isinstance(data, dict) or not isinstance(data.get("rules"), list):
        raise ValueError("expected a mapping with a 'rules' list")
    unknown = sorted(set(data) - {"version", "macros", "rules"})
    if unknown:
        raise ValueError(f"unknown top-level keys {unknown}")
    macros = data.get("macros") or {}
    if not isinstance(macros, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                               for k, v in macros.items()):
        raise ValueError("macros must map names to regex strings")
    # Macros may use earlier macros.
    expanded: dict[str, str] = {}
    for name, body in macros.items():
        expanded[name] = _MACRO_RE.sub(lambda m: expanded.get(m.group(1), m.group(0)), body)
    seen: set[str] = set()
    rules = [_parse_rule(entry, index, expanded, seen) for index, entry in enumerate(data["rules"])]
    if not rules:
        raise ValueError("no rules")
    return rules


# --------------------------------------------------------------------------------------------
# Matching
# --------------------------------------------------------------------------------------------


def is_word_char(char: str) -> bool:
    return char.isalnum() or char == "_"  # exactly sre's \\w for str patterns


def search_rule(rule: Rule, text: str, start: int = 0, stop: int | None = None) -> bool:
    """Whether ``rule`` matches inside ``text[start:stop]``, window by window when long.

    A match touching ``stop`` (or a window's end) before the real end of the text may owe its
    end to the cut (``\\b``, ``$``), so it is not taken: the next window, which starts
    ``OVERLAP`` characters earlier, sees such a match whole, with its real context; lookbehinds
    and ``\\b`` at ``start`` see the real text before it. A rule's leading ``\\b`` and its
    ``not_after`` context are checked here, on each candidate match.
    """
    regex, lead_boundary, not_after = rule.regex, rule.lead_boundary, rule.not_after
    n = len(text)
    stop = n if stop is None else min(stop, n)
    while True:
        end = min(start + WINDOW, stop)
        pos = start
        while pos < end:
            match = regex.search(text, pos, end)
            if match is None:
                break
            at = match.start()
            pos = at + 1
            if match.end() >= end and end != n:
                continue
            if lead_boundary and (at > 0 and is_word_char(text[at - 1])) == is_word_char(text[at]):
                continue
            if not_after is not None and not_after.search(text, max(0, at - 32), at):
                continue
            return True
        if end >= stop:
            return False
        start += WINDOW - OVERLAP
