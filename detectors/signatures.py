"""Signature detector: known prompt-injection and jailbreak phrasings, matched by regex rules
loaded from YAML, also inside base64 / hex / URL-encoded / rot13 / leetspeak payloads.

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

Scoring: :meth:`SignatureDetector.score` is the largest weight of the rules that match the text
or a decoding of it (0.0 if none); :meth:`SignatureDetector.reasons` lists
``signature:<rule id>`` for each rule matched and ``encoded:<scheme>`` for each scheme a match
had to be decoded through. Neither ever contains input text.

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
* Decoding is bounded: at most ``max_decode_depth`` (<= 2) nested decodings, at most
  ``MAX_SPANS`` decoded spans per scheme and text (``MAX_SPAN_ATTEMPTS`` tried), spans of at
  most ``MAX_SPAN_CHARS`` characters, at most ``MAX_LEET_TOKENS`` leet tokens, whole-text
  schemes at depth 2 only on candidates of at most ``MAX_NESTED_WHOLE_CHARS`` characters, and
  ``4 * len(text) + 65536`` decoded characters in all. A decoding is rescanned only near what
  it changed (a match elsewhere was a match before). rot13 is tried only on text containing the
  rot13 of a common English or attack word, leetspeak only on tokens such as "1gn0r3".
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import importlib.resources
import re
import urllib.parse
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import Field

from bastion.core.registry import StageOptions, register
from bastion.detectors.base import TextDetector

try:  # the regex parser, for the match-width check (private, stable since 3.11)
    from re import _parser as _sre_parse  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - Python < 3.11
    import sre_parse as _sre_parse  # type: ignore[no-redef]

__all__ = ["SCHEMES", "Rule", "SignatureDetector", "load_rules", "parse_rules", "rule_matches",
           "keywords_present", "default_rules_path", "decode_candidates"]

Scheme = Literal["base64", "hex", "rot13", "url", "leetspeak"]
SCHEMES: tuple[str, ...] = ("base64", "hex", "rot13", "url", "leetspeak")
WHOLE_TEXT_SCHEMES = frozenset({"rot13", "url", "leetspeak"})

WINDOW = 8192
OVERLAP = 1024
MAX_MATCH_WIDTH = OVERLAP - 1
MAX_SPANS = 16
MAX_SPAN_ATTEMPTS = 64
MAX_SPAN_CHARS = 65536
MAX_NESTED_WHOLE_CHARS = 65536
MIN_BASE64_CHARS = 16
MIN_HEX_BYTES = 8
MIN_URL_ESCAPES = 3
MAX_LEET_TOKENS = 256

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


def _fold(text: str) -> str:
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
                    and chr(node[1]) != _fold(chr(node[1]))):
                found.append(chr(node[1]))
                return
            for item in node:
                walk(item)

    walk(_sre_parse.parse(pattern, 0))
    return found


def _max_width(pattern: str, flags: int) -> tuple[int, int]:
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
        out.append(tuple(_fold(w) if ignore_case else w for w in words))
    return tuple(out)


def keywords_present(rule: Rule, text: str) -> bool:
    """Whether ``text`` passes the rule's keyword prefilter."""
    target = _fold(text) if rule.folded else text
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
        pattern = re.escape(_fold(literal) if ignore_case else literal)
        if not keywords:
            keywords = ((_fold(literal) if ignore_case else literal,),)
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
    low, high = _max_width(pattern, flags)
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
    return _search(rule, _fold(text) if rule.folded else text)


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


def _is_word(char: str) -> bool:
    return char.isalnum() or char == "_"  # exactly sre's \\w for str patterns


def _search(rule: Rule, text: str, start: int = 0, stop: int | None = None) -> bool:
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
            if lead_boundary and (at > 0 and _is_word(text[at - 1])) == _is_word(text[at]):
                continue
            if not_after is not None and not_after.search(text, max(0, at - 32), at):
                continue
            return True
        if end >= stop:
            return False
        start += WINDOW - OVERLAP


def _merge_ranges(regions: list[tuple[int, int]], margin: int,
                  n: int) -> list[tuple[int, int]]:
    """``regions`` widened by ``margin`` on both sides, clipped to [0, n], overlaps merged."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(regions):
        a, b = max(0, a - margin), min(n, b + margin)
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


# --------------------------------------------------------------------------------------------
# Decoders: text -> decoded text (or None when there is nothing to decode)
# --------------------------------------------------------------------------------------------

_BASE64_RE = re.compile(r"(?<![A-Za-z0-9+/_-])[A-Za-z0-9+/_-]{%d,}={0,2}" % MIN_BASE64_CHARS)
_HEX_RE = re.compile(
    r"(?<![0-9A-Fa-f])(?:[0-9A-Fa-f]{2}){%d,}(?![0-9A-Fa-f])"        # 49676e6f7265
    r"|(?:[0-9A-Fa-f]{2}[ :,-]){%d,}[0-9A-Fa-f]{2}(?![0-9A-Fa-f])"    # 49 67 6e / 49:67:6e
    r"|(?:(?:\\x|0x)[0-9A-Fa-f]{2}[ ,]{0,2}){%d,}"                    # \x49\x67 / 0x49 0x67
    % (MIN_HEX_BYTES, MIN_HEX_BYTES - 1, MIN_HEX_BYTES))
# Runs of the characters _HEX_RE spans consist of: a single-class scan, much cheaper than
# _HEX_RE, which then runs on the runs only.
_HEX_RUN_RE = re.compile(r"[0-9A-Fa-fx\\ :,-]{16,}")
_HEX_STRIP_RE = re.compile(r"\\x|0x|[^0-9A-Fa-f]")
_PCT_RE = re.compile(r"%[0-9A-Fa-f]{2}")
_PCT_RUN_RE = re.compile(r"(?:%[0-9A-Fa-f]{2}|\+)*%[0-9A-Fa-f]{2}(?:%[0-9A-Fa-f]{2}|\+)*")
# rot13 of common English and attack words (the, and, you, your, this, with, ...), lower case.
_ROT13_HINT_RE = re.compile(
    r"(?:gur|naq|lbh|lbhe|guvf|jvgu|sbe|abg|ner|nyy|jung|nal|"
    r"vtaber|cerivbhf|vafgehpgvbaf|ehyrf|flfgrz|cebzcg|qvfertneq|sbetrg|cergraq|nalguvat|"
    r"zbqr|qrirybcre|erirny|nobir)\b")
_UNPRINTABLE_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffd]")
_ROT13 = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
                       "NOPQRSTUVWXYZABCDEFGHIJKLMnopqrstuvwxyzabcdefghijklm")
_LEET_COMMON = {"4": "a", "@": "a", "8": "b", "3": "e", "6": "g", "9": "g", "!": "i",
                "|": "l", "0": "o", "5": "s", "$": "s", "7": "t", "+": "t", "2": "z"}
_LEET_I = str.maketrans({**_LEET_COMMON, "1": "i"})
_LEET_L = str.maketrans({**_LEET_COMMON, "1": "l"})
# A word with a leet symbol inside ("pr3v10u5", "h4ck") or a digit, @ or $ before a letter
# ("1gn0r3", "4ll", "$ecret"); "mp3", "COVID-19" or "Hello!" are not leet tokens.
_LEET_TOKEN_RE = re.compile(r"[A-Za-z0-9@$|!+]{0,40}?(?:[A-Za-z][0-9@$|!+][A-Za-z0-9]|[0-9@$]"
                            r"[A-Za-z])[A-Za-z0-9@$|!+]{0,40}")
_DIGIT_RUN_RE = re.compile(r"[0-9]{3}")


def _texty(decoded: str) -> bool:
    """Decoded bytes that read as text: mostly printable, with some letters."""
    if len(decoded) < 4:
        return False
    bad = len(_UNPRINTABLE_RE.findall(decoded))
    if bad * 10 > len(decoded):
        return False
    return any(ch.isalpha() for ch in decoded[:256])


def _bytes_to_text(raw: bytes) -> str | None:
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return decoded if _texty(decoded) else None


def _b64(span: str) -> str | None:
    core = span.rstrip("=").replace("-", "+").replace("_", "/")
    # A payload glued to 1-3 leading alphabet characters ("x=SWdu...", "%3DSWdu...") is
    # misaligned: try the four alignments.
    for shift in range(4):
        chunk = core[shift:]
        if len(chunk) % 4 == 1:
            chunk = chunk[:-1]
        if len(chunk) < 8:
            break
        chunk += "=" * (-len(chunk) % 4)
        try:
            raw = base64.b64decode(chunk, validate=True)
        except (binascii.Error, ValueError):
            continue
        decoded = _bytes_to_text(raw)
        if decoded is not None:
            return decoded
    return None


def _hex(span: str) -> str | None:
    digits = _HEX_STRIP_RE.sub("", span)
    if len(digits) % 2:
        digits = digits[:-1]
    try:
        raw = bytes.fromhex(digits)
    except ValueError:
        return None
    return _bytes_to_text(raw)


# A decoding is (decoded text, regions): regions are the [start, stop) ranges of the decoded
# text that differ from the text it was decoded from, or None when all of it may differ. Rules
# need only be searched near those ranges: a match elsewhere was already a match before.
Decoded = tuple[str, "list[tuple[int, int]] | None"]


def _replace_spans(text: str, pattern: re.Pattern, decode) -> Decoded | None:
    """``text`` with each decodable span of ``pattern`` replaced by its decoding (bounded)."""
    pieces: list[str] = []
    regions: list[tuple[int, int]] = []
    last = attempts = decoded_count = length = 0
    for match in pattern.finditer(text):
        attempts += 1
        span = match.group()[:MAX_SPAN_CHARS]
        decoded = decode(span)
        if decoded is not None:
            before = text[last:match.start()]
            pieces.append(before)
            pieces.append(f" {decoded} ")
            length += len(before)
            regions.append((length, length + len(decoded) + 2))
            length += len(decoded) + 2
            last = match.end()
            decoded_count += 1
            if decoded_count >= MAX_SPANS:
                break
        if attempts >= MAX_SPAN_ATTEMPTS:
            break
    if not decoded_count:
        return None
    pieces.append(text[last:])
    return "".join(pieces), regions


def _decode_base64(text: str) -> list[Decoded]:
    out = _replace_spans(text, _BASE64_RE, _b64)
    return [out] if out is not None else []


def _decode_hex(text: str) -> list[Decoded]:
    pieces: list[str] = []
    regions: list[tuple[int, int]] = []
    last = length = attempts = decoded_count = 0
    for run in _HEX_RUN_RE.finditer(text):
        for match in _HEX_RE.finditer(text, run.start(), run.end()):
            attempts += 1
            decoded = _hex(match.group()[:MAX_SPAN_CHARS])
            if decoded is not None:
                before = text[last:match.start()]
                pieces.append(before)
                pieces.append(f" {decoded} ")
                length += len(before)
                regions.append((length, length + len(decoded) + 2))
                length += len(decoded) + 2
                last = match.end()
                decoded_count += 1
            if decoded_count >= MAX_SPANS or attempts >= MAX_SPAN_ATTEMPTS:
                break
        if decoded_count >= MAX_SPANS or attempts >= MAX_SPAN_ATTEMPTS:
            break
    if not decoded_count:
        return []
    pieces.append(text[last:])
    return [("".join(pieces), regions)]


def _decode_url(text: str) -> list[Decoded]:
    """Percent-decode runs of %XX escapes (and '+' inside them, as in query strings)."""
    count = 0
    for _ in _PCT_RE.finditer(text):
        count += 1
        if count >= MIN_URL_ESCAPES:
            break
    else:
        return []
    pieces: list[str] = []
    regions: list[tuple[int, int]] = []
    last = length = 0
    for match in _PCT_RUN_RE.finditer(text):
        before = text[last:match.start()]
        decoded = urllib.parse.unquote_plus(match.group(), errors="replace")
        pieces.append(before)
        pieces.append(decoded)
        length += len(before)
        regions.append((length, length + len(decoded)))
        length += len(decoded)
        last = match.end()
    pieces.append(text[last:])
    return [("".join(pieces), regions)]


def _decode_rot13(text: str) -> list[Decoded]:
    # Only text with a word that is the rot13 of a common English or attack word ("gur",
    # "lbhe", "vtaber") is read as rot13: prose and noise skip a whole-text rescan.
    folded = _fold(text)
    for hint in _ROT13_HINT_RE.finditer(folded):  # (no leading \b: sre is faster without)
        if hint.start() == 0 or not _is_word(folded[hint.start() - 1]):
            break
    else:
        return []
    return [(text.translate(_ROT13), None)]


def _decode_leetspeak(text: str) -> list[Decoded]:
    """Read the leet tokens ("1gn0r3") as letters; two readings of 1 (i and l)."""
    spans = []
    for number, match in enumerate(_LEET_TOKEN_RE.finditer(text)):
        if number >= MAX_LEET_TOKENS:
            break
        token = match.group()
        # Not leet: fewer than two letters ("11T13"), numbers ("yos2000"), e-mail addresses.
        if (sum(ch.isalpha() for ch in token) < 2 or _DIGIT_RUN_RE.search(token)
                or ("@" in token and text[match.end():match.end() + 1] == ".")):
            continue
        spans.append(match.span())
    if not spans:
        return []
    out: list[Decoded] = []
    tables = (_LEET_I, _LEET_L) if any("1" in text[a:b] for a, b in spans) else (_LEET_I,)
    for table in tables:
        pieces, last = [], 0
        for a, b in spans:
            pieces.append(text[last:a])
            pieces.append(text[a:b].translate(table))
            last = b
        pieces.append(text[last:])
        out.append(("".join(pieces), spans))
    return out


_DECODERS = {"base64": _decode_base64, "hex": _decode_hex, "url": _decode_url,
             "rot13": _decode_rot13, "leetspeak": _decode_leetspeak}


def decode_candidates(text: str, scheme: str) -> list[str]:
    """The decodings of ``text`` under ``scheme`` (empty when there is nothing to decode)."""
    return [decoded for decoded, _ in _DECODERS[scheme](text)]


# --------------------------------------------------------------------------------------------
# The detector
# --------------------------------------------------------------------------------------------


class SignatureDetector(TextDetector):
    """Regex signatures over the text and its decodings; see the module docstring."""

    def __init__(self, rules: Sequence[Rule], decode: Iterable[str] = SCHEMES,
                 max_decode_depth: int = 2):
        self.rules: tuple[Rule, ...] = tuple(rules)
        if not self.rules:
            raise ValueError("a signature detector needs at least one rule")
        decode = tuple(dict.fromkeys(decode))
        unknown = [s for s in decode if s not in _DECODERS]
        if unknown:
            raise ValueError(f"unknown decode schemes {unknown}; known: {list(SCHEMES)}")
        if not 0 <= max_decode_depth <= 2:
            raise ValueError("max_decode_depth must be 0, 1 or 2")
        self.decode = decode
        self.max_decode_depth = max_decode_depth if decode else 0
        self._folded_keywords = tuple(sorted({k for rule in self.rules if rule.folded
                                              for group in rule.keywords for k in group}))
        self._raw_keywords = tuple(sorted({k for rule in self.rules if not rule.folded
                                           for group in rule.keywords for k in group}))
        self._max_weight = max(rule.weight for rule in self.rules)
        self._max_width = max(_max_width(rule.regex.pattern, rule.regex.flags)[1]
                              for rule in self.rules)

    @classmethod
    def from_yaml(cls, path: str | Path | None = None, **kwargs) -> "SignatureDetector":
        return cls(load_rules(path), **kwargs)

    # -- matching ------------------------------------------------------------------------------

    def matching_rules(self, text: str,
                       regions: list[tuple[int, int]] | None = None) -> set[int]:
        """Indices of the rules matching ``text`` itself (no decoding).

        With ``regions``, only matches that overlap one of those ranges are looked for.
        """
        folded = _fold(text)  # same length as text: _PREFOLD removed the one expanding case
        if regions is None:
            ranges = [(0, len(text))]
            scope, scope_raw = folded, text
        else:
            margin = self._max_width + 16
            ranges = _merge_ranges(regions, margin, len(text))
            if not ranges:
                return set()
            scope = "\n".join(folded[a:b] for a, b in ranges)
            scope_raw = "\n".join(text[a:b] for a, b in ranges)
        present = {k for k in self._folded_keywords if k in scope}
        present_raw = {k for k in self._raw_keywords if k in scope_raw}
        hits = set()
        for index, rule in enumerate(self.rules):
            found = present if rule.folded else present_raw
            if any(found.isdisjoint(group) for group in rule.keywords):
                continue
            target = folded if rule.folded else text
            if any(_search(rule, target, a, b) for a, b in ranges):
                hits.add(index)
        return hits

    def _analyze(self, text: Any, stop_at_max: bool) -> tuple[set[int], set[str]]:
        """Rules matched by ``text`` or its decodings, and the schemes those matches needed."""
        if not isinstance(text, str):
            text = bytes(text).decode("utf-8", "replace")
        hits = self.matching_rules(text)
        schemes: set[str] = set()
        if stop_at_max and hits and max(self.rules[i].weight for i in hits) >= self._max_weight:
            return hits, schemes
        budget = 4 * len(text) + 65536
        # (candidate, the hits of it and its ancestors, scheme chain)
        frontier: list[tuple[str, set[int], tuple[str, ...]]] = [(text, set(hits), ())]
        for depth in range(self.max_decode_depth):
            next_frontier = []
            for candidate, known, chain in frontier:
                for scheme in self.decode:
                    if chain and scheme == chain[-1] and scheme in ("rot13", "leetspeak"):
                        continue  # rot13 twice is the identity; leet twice changes nothing
                    if (depth and scheme in WHOLE_TEXT_SCHEMES
                            and len(candidate) > MAX_NESTED_WHOLE_CHARS):
                        continue
                    for decoded, regions in _DECODERS[scheme](candidate):
                        budget -= len(decoded)
                        if budget < 0:
                            return hits, schemes
                        found = self.matching_rules(decoded, regions)
                        new = found - known
                        if new:
                            hits |= new
                            schemes.update(chain + (scheme,))
                            if stop_at_max and max(self.rules[i].weight
                                                   for i in hits) >= self._max_weight:
                                return hits, schemes
                        next_frontier.append((decoded, known | found, chain + (scheme,)))
            frontier = next_frontier
        return hits, schemes

    # -- Detector interface --------------------------------------------------------------------

    def score(self, batch: Sequence[Any]) -> np.ndarray:
        out = np.zeros(len(batch), dtype=np.float64)
        for index, text in enumerate(batch):
            hits, _ = self._analyze(text, stop_at_max=True)
            if hits:
                out[index] = max(self.rules[i].weight for i in hits)
        return out

    def reasons(self, item: Any) -> list[str]:
        hits, schemes = self._analyze(item, stop_at_max=False)
        ids = sorted(self.rules[i].id for i in hits)
        return ([f"signature:{rule_id}" for rule_id in ids]
                + [f"encoded:{scheme}" for scheme in SCHEMES if scheme in schemes])


# --------------------------------------------------------------------------------------------
# Stage registration
# --------------------------------------------------------------------------------------------


class SignatureOptions(StageOptions):
    #: Path of a YAML rule file; None = the bundled default rules.
    rules: str | None = None
    decode: tuple[Scheme, ...] = SCHEMES  # type: ignore[assignment]
    max_decode_depth: int = Field(default=2, ge=0, le=2)


def build_signature_detector(options: SignatureOptions) -> SignatureDetector:
    return SignatureDetector(load_rules(options.rules), decode=options.decode,
                             max_decode_depth=options.max_decode_depth)


register("detect.signatures", "detector", SignatureOptions, build_signature_detector)
