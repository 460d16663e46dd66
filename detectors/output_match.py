"""Matchers for output scanning: the types they share and the regex matcher.

A *matcher* finds one kind of thing in generated text (a canary, an API key, an e-mail
address) and says what to do about it: ``redact`` (replace it by a marker) or ``stop`` (end the
stream). :class:`bastion.detectors.output_scan.OutputGuard` runs matchers over a stream of
chunks; the concrete rules live in ``output_rules`` (secrets, PII) and ``output_canary``
(canaries, fuzzy secret-text leaks).

The contract a matcher keeps, which is what lets the guard scan a stream incrementally and get
exactly the result it would get on the whole text at once:

* ``search(text, pos)`` returns the first :class:`Hit` whose ``anchor`` (where the match attempt
  began) is at or after ``pos``, or ``None``. ``text`` may hold characters before ``pos``
  (left context, at least ``lookbehind`` of them where the stream has them).
* ``max_span`` bounds the characters an attempt at position ``q`` reads: only
  ``text[q - lookbehind : q + max_span]`` decide whether and what it matches. So an attempt
  with ``q + max_span <= len(text)`` gives the same answer on any longer text: the guard holds
  back at least ``max_span`` characters and treats only such attempts as final.
* After a hit, searching resumes at ``hit.resume`` (the end of the match), as ``re.finditer``
  does: one matcher's hits never overlap.
* A matcher with an ``extension`` keeps redacting past its match while the text continues the
  secret (the rest of a long token, the body of a PEM block); extensions read a stream
  character by character and give the same result however it is cut.

Findings never carry matched text: a rule name and a fixed ``label`` only.
"""
from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Callable
from re import _constants as sre_constants  # noqa: PLC2701 - sre's parse tree, for spans
from re import _parser as sre_parser  # noqa: PLC2701
from typing import NamedTuple, Protocol

#: Most characters of left context any matcher may need (lookbehind).
MAX_LOOKBEHIND = 16


class Action(str, enum.Enum):
    REDACT = "redact"
    STOP = "stop"


def as_action(value: "Action | str") -> Action:
    try:
        return Action(value)
    except ValueError:
        raise ValueError(f"action must be 'redact' or 'stop', not {value!r}") from None


@dataclasses.dataclass(frozen=True)
class Finding:
    """One thing found in the output. ``start``/``end`` are character (code point) offsets of
    the rule's match in the generated text as it came from the model (before any redaction); a
    redaction with an extension reaches past ``end`` (the rest of a token, a PEM body).
    ``label`` is safe to log and to show (it is what the marker says); the matched text itself
    is never kept."""
    kind: str      # "canary" | "secret" | "pii"
    rule: str      # e.g. "aws_access_key", "email", "canary:0", "secret_text:0"
    label: str     # e.g. "aws_access_key", "email", "canary"
    action: Action
    start: int
    end: int


class Hit(NamedTuple):
    anchor: int   # where the match attempt began (<= start)
    start: int    # the span to redact or stop at
    end: int
    resume: int   # where this matcher's next search begins (the end of the whole match)


class Extension(Protocol):
    def advance(self, text: str, pos: int, final: bool) -> tuple[int, bool]:
        """Consume from ``text[pos:]``: return (new position, done). Not done means every
        character up to ``len(text)`` was consumed and more may follow."""


class Matcher(Protocol):
    name: str
    kind: str
    label: str
    action: Action
    max_span: int
    lookbehind: int

    def search(self, text: str, pos: int) -> Hit | None: ...

    def extension(self) -> Extension | None: ...


# -- spans of regular expressions ---------------------------------------------------------------

_UNBOUNDED = float("inf")
_BOUNDARIES = {sre_constants.AT_BOUNDARY, sre_constants.AT_NON_BOUNDARY,
               sre_constants.AT_UNI_BOUNDARY, sre_constants.AT_UNI_NON_BOUNDARY,
               sre_constants.AT_LOC_BOUNDARY, sre_constants.AT_LOC_NON_BOUNDARY}


def regex_bounds(pattern: "re.Pattern[str] | str") -> tuple[float, int]:
    """(max_span, lookbehind) of a regex: the most characters one match attempt reads from
    where it starts (its widest match plus its widest lookahead; ``inf`` where a repeat is
    unbounded) and the most it reads before that start. Anchors other than ``\\b``/``\\B`` (``^``,
    ``$``, ``\\A``, ``\\Z``) and backreferences are refused: on a window of a stream they do not
    mean what they mean on the whole text."""
    if isinstance(pattern, str):
        pattern = re.compile(pattern)
    tree = sre_parser.parse(pattern.pattern, pattern.flags)
    extra = {"ahead": 0, "behind": 0}

    def width(sub) -> float:
        total = 0.0
        for op, av in sub:
            if op in (sre_constants.LITERAL, sre_constants.NOT_LITERAL, sre_constants.ANY,
                      sre_constants.IN, sre_constants.CATEGORY):
                total += 1
            elif op is sre_constants.SUBPATTERN:
                total += width(av[-1])
            elif op is sre_constants.ATOMIC_GROUP:
                total += width(av)
            elif op is sre_constants.BRANCH:
                total += max(width(alt) for alt in av[1])
            elif op in (sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT,
                        sre_constants.POSSESSIVE_REPEAT):
                low, high, item = av
                inner = width(item)
                total += _UNBOUNDED if high == sre_constants.MAXREPEAT and inner else high * inner
            elif op in (sre_constants.ASSERT, sre_constants.ASSERT_NOT):
                direction, sub_pattern = av
                w = width(sub_pattern)
                key = "ahead" if direction == 1 else "behind"
                extra[key] = max(extra[key], w)
            elif op is sre_constants.AT:
                if av not in _BOUNDARIES:
                    raise ValueError(f"pattern {pattern.pattern!r}: anchor {av} is not allowed "
                                     "on a stream window (use \\b or lookarounds)")
                extra["ahead"] = max(extra["ahead"], 1)
                extra["behind"] = max(extra["behind"], 1)
            else:
                raise ValueError(f"pattern {pattern.pattern!r}: {op} is not supported")
        return total

    span = width(tree)
    if extra["behind"] == _UNBOUNDED:
        raise ValueError(f"pattern {pattern.pattern!r}: unbounded lookbehind")
    return span + extra["ahead"], int(extra["behind"])


# -- the regex matcher --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class RegexMatcher:
    """A compiled pattern, an optional ``validate(matched_text) -> bool`` (a rejected match is
    retried one character further on, so validation never hides a later match), an optional
    ``group`` whose span is what is redacted (the rest of the match is context) and an optional
    ``required`` literal that every match contains (searched for first, with ``str.find``).
    ``max_span`` and ``lookbehind`` are derived from the pattern; pass ``max_span`` only for a
    pattern whose reach is bounded by a lookahead the parser cannot see through (it must be
    checked)."""
    name: str
    kind: str
    pattern: re.Pattern[str]
    action: Action = Action.REDACT
    label: str = ""
    validate: Callable[[str], bool] | None = None
    group: int = 0
    max_span: int = 0
    lookbehind: int = 0
    extend: Callable[[], Extension] | None = None
    required: str = ""      # a literal every match contains (a cheap prefilter), e.g. "@"

    def __post_init__(self):
        object.__setattr__(self, "action", as_action(self.action))
        if not self.label:
            object.__setattr__(self, "label", self.name)
        span, behind = regex_bounds(self.pattern)
        if not self.max_span:
            if span == _UNBOUNDED:
                raise ValueError(f"rule {self.name}: pattern {self.pattern.pattern!r} has no "
                                 "bounded span; bound its repeats (and add an extension for the "
                                 "rest of a long token)")
            object.__setattr__(self, "max_span", int(span))
        object.__setattr__(self, "lookbehind", max(self.lookbehind, behind))
        if self.lookbehind > MAX_LOOKBEHIND:
            raise ValueError(f"rule {self.name}: lookbehind {self.lookbehind} > {MAX_LOOKBEHIND}")

    def search(self, text: str, pos: int) -> Hit | None:
        if self.required and text.find(self.required, pos) < 0:
            return None
        search, validate, group = self.pattern.search, self.validate, self.group
        while True:
            m = search(text, pos)
            if m is None:
                return None
            if validate is None or validate(m.group(group)):
                start, end = m.span(group)
                if end > start:
                    return Hit(m.start(), start, end, max(m.end(), m.start() + 1))
            pos = m.start() + 1

    def extension(self) -> Extension | None:
        return self.extend() if self.extend else None


# -- extensions ---------------------------------------------------------------------------------

class RunExtension:
    """Redaction goes on over a run of characters of one class (the rest of a token longer
    than its rule's bounded pattern), at most ``cap`` characters."""

    def __init__(self, char_class: str, cap: int = 16384):
        self._run = re.compile(f"[{char_class}]*")
        self._left = cap

    def advance(self, text: str, pos: int, final: bool) -> tuple[int, bool]:
        end = self._run.match(text, pos, min(len(text), pos + self._left)).end()
        self._left -= end - pos
        return end, final or end < len(text) or self._left <= 0


class PemExtension:
    """The body of a PEM (or PuTTY) private key after its ``BEGIN ... PRIVATE KEY`` line:
    with ``header_line`` (PEM), starts only where a line break follows the header; then runs
    over base64 lines and ``Name: value`` header lines up to and including the
    ``-----END ...-----`` line (or the first character that cannot be in a key body, or
    ``cap`` characters)."""

    BODY = re.compile(r"[A-Za-z0-9+/=\r\n\t :,.-]*")
    END = re.compile(r"-----END[A-Z0-9 ]{1,40}-----")
    HEADER_REST = re.compile(r"[A-Z0-9 ]{0,20}-{0,5}")

    def __init__(self, cap: int = 16384, header_line: bool = True):
        self._started = not header_line
        self._tail = ""
        self._left = cap

    def advance(self, text: str, pos: int, final: bool) -> tuple[int, bool]:
        if not self._started:
            # The rule matched up to "PRIVATE KEY" and maybe part of the dashes after it.
            end = self.HEADER_REST.match(text, pos).end()
            if end == len(text) and not final:
                return pos, False       # wait: the header line is not over yet
            if end == len(text) or text[end] not in "\r\n":
                return end, True        # a mention in prose, not a key block
            self._started, pos = True, end
        end = self.BODY.match(text, pos, min(len(text), pos + self._left)).end()
        window = self._tail + text[pos:end]
        closing = self.END.search(window)
        if closing:
            return pos + closing.end() - len(self._tail), True
        self._tail = window[-64:]
        self._left -= end - pos
        return end, final or end < len(text) or self._left <= 0
