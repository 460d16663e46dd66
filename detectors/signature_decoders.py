"""Decoders for the ``detect.signatures`` stage: base64, hex, URL (percent) encoding, rot13 and
leetspeak payloads inside a text, decoded so the signature rules
(:mod:`bastion.detectors.signature_rules`) can be run on what they hide.

A decoder maps a text to its decodings (none when there is nothing to decode), each with the
ranges it changed, so a rule need only be searched near them. Each is bounded: at most
``MAX_SPANS`` decoded spans per scheme and text (``MAX_SPAN_ATTEMPTS`` tried), spans of at most
``MAX_SPAN_CHARS`` characters, at most ``MAX_LEET_TOKENS`` leet tokens. rot13 is tried only on
text containing the rot13 of a common English or attack word, leetspeak only on tokens such as
"1gn0r3".
"""
from __future__ import annotations

import base64
import binascii
import re
import urllib.parse
from typing import Literal

from bastion.detectors.signature_rules import fold_case, is_word_char

__all__ = ["SCHEMES", "Scheme", "WHOLE_TEXT_SCHEMES", "DECODERS", "Decoded", "decode_candidates"]

Scheme = Literal["base64", "hex", "rot13", "url", "leetspeak"]
SCHEMES: tuple[str, ...] = ("base64", "hex", "rot13", "url", "leetspeak")
#: The whole-text schemes: at depth 2 the detector tries them only on candidates of at most
#: ``MAX_NESTED_WHOLE_CHARS`` characters (:mod:`bastion.detectors.signatures`).
WHOLE_TEXT_SCHEMES = frozenset({"rot13", "url", "leetspeak"})

MAX_SPANS = 16
MAX_SPAN_ATTEMPTS = 64
MAX_SPAN_CHARS = 65536
MIN_BASE64_CHARS = 16
MIN_HEX_BYTES = 8
MIN_URL_ESCAPES = 3
MAX_LEET_TOKENS = 256

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


class _Splice:
    """``text`` rebuilt with some of its spans replaced, and the ranges the replacements take
    in the result (a :data:`Decoded`)."""

    def __init__(self, text: str):
        self.text = text
        self.pieces: list[str] = []
        self.regions: list[tuple[int, int]] = []
        self.last = self.length = self.count = 0

    def replace(self, start: int, stop: int, piece: str) -> None:
        """Put ``piece`` in place of ``text[start:stop]`` (spans come in text order)."""
        before = self.text[self.last:start]
        self.pieces.append(before)
        self.pieces.append(piece)
        self.length += len(before)
        self.regions.append((self.length, self.length + len(piece)))
        self.length += len(piece)
        self.last = stop
        self.count += 1

    def result(self) -> Decoded:
        return "".join(self.pieces) + self.text[self.last:], self.regions


def _replace_spans(text: str, pattern: re.Pattern, decode) -> Decoded | None:
    """``text`` with each decodable span of ``pattern`` replaced by its decoding (bounded)."""
    splice = _Splice(text)
    attempts = 0
    for match in pattern.finditer(text):
        attempts += 1
        decoded = decode(match.group()[:MAX_SPAN_CHARS])
        if decoded is not None:
            splice.replace(match.start(), match.end(), f" {decoded} ")
            if splice.count >= MAX_SPANS:
                break
        if attempts >= MAX_SPAN_ATTEMPTS:
            break
    return splice.result() if splice.count else None


def _decode_base64(text: str) -> list[Decoded]:
    out = _replace_spans(text, _BASE64_RE, _b64)
    return [out] if out is not None else []


def _decode_hex(text: str) -> list[Decoded]:
    splice = _Splice(text)
    attempts = 0
    for run in _HEX_RUN_RE.finditer(text):
        for match in _HEX_RE.finditer(text, run.start(), run.end()):
            attempts += 1
            decoded = _hex(match.group()[:MAX_SPAN_CHARS])
            if decoded is not None:
                splice.replace(match.start(), match.end(), f" {decoded} ")
            if splice.count >= MAX_SPANS or attempts >= MAX_SPAN_ATTEMPTS:
                break
        if splice.count >= MAX_SPANS or attempts >= MAX_SPAN_ATTEMPTS:
            break
    return [splice.result()] if splice.count else []


def _decode_url(text: str) -> list[Decoded]:
    """Percent-decode runs of %XX escapes (and '+' inside them, as in query strings)."""
    count = 0
    for _ in _PCT_RE.finditer(text):
        count += 1
        if count >= MIN_URL_ESCAPES:
            break
    else:
        return []
    splice = _Splice(text)
    for match in _PCT_RUN_RE.finditer(text):
        splice.replace(match.start(), match.end(),
                       urllib.parse.unquote_plus(match.group(), errors="replace"))
    return [splice.result()]


def _decode_rot13(text: str) -> list[Decoded]:
    # Only text with a word that is the rot13 of a common English or attack word ("gur",
    # "lbhe", "vtaber") is read as rot13: prose and noise skip a whole-text rescan.
    folded = fold_case(text)
    for hint in _ROT13_HINT_RE.finditer(folded):  # (no leading \b: sre is faster without)
        if hint.start() == 0 or not is_word_char(folded[hint.start() - 1]):
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


#: Scheme -> decoder (a text -> its decodings, each with the ranges it changed).
DECODERS = {"base64": _decode_base64, "hex": _decode_hex, "url": _decode_url,
            "rot13": _decode_rot13, "leetspeak": _decode_leetspeak}


def decode_candidates(text: str, scheme: str) -> list[str]:
    """The decodings of ``text`` under ``scheme`` (empty when there is nothing to decode)."""
    return [decoded for decoded, _ in DECODERS[scheme](text)]
