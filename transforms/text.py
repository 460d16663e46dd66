"""Text sanitizers: Unicode normalization, invisible/control stripping, confusable folding,
whitespace collapse, and size caps for BYTES (text) inputs.

Every sanitizer is a :class:`~bastion.transforms.base.TextTransform` whose ``apply_text`` returns
``(new_text, {category: count})``. Counts are characters changed, removed or inserted, by
category; the exact definition of each is documented on the class. All sanitizers are pure,
idempotent (applying one twice gives the result of applying it once) and hold no per-call state,
so one instance is safe to share between threads.

Stages registered here (see :mod:`bastion.core.registry`):

* ``sanitize.unicode`` -- the composite, options ``nfkc``, ``strip_invisible``,
  ``fold_confusables``, ``strip_control``, ``collapse_whitespace``; see :class:`UnicodeSanitizer`
  for its fixed order.
* ``sanitize.nfkc``, ``sanitize.invisible``, ``sanitize.confusables``, ``sanitize.control``,
  ``sanitize.whitespace`` -- the single-purpose steps, no options.
* ``limit.text`` -- size caps (``max_bytes``, ``max_chars``, ``max_elements``) that reject the
  request with :class:`~bastion.transforms.base.InputRejected`.
"""
from __future__ import annotations

import functools
import re
import threading
import unicodedata
from collections import Counter

import numpy as np
from pydantic import Field, model_validator

from bastion.core.registry import StageOptions, register
from bastion.transforms.base import (
    TEXT_DATATYPES,
    InputRejected,
    TextTransform,
    Transform,
    TransformContext,
    TransformResult,
)

__all__ = [
    "NFKC_MAX_EXPANSION",
    "CATEGORIES",
    "NFKCNormalizer",
    "InvisibleStripper",
    "ConfusableFolder",
    "ControlStripper",
    "WhitespaceCollapser",
    "UnicodeSanitizer",
    "TextLimits",
    "invisible_category",
]

#: The largest number of code points NFKC turns one code point into (U+FDFA ARABIC LIGATURE
#: SALLALLAHOU ALAYHE WASALLAM becomes 18). Canonical composition only shortens text, so
#: ``len(nfkc(s)) <= NFKC_MAX_EXPANSION * len(s)`` for every string.
NFKC_MAX_EXPANSION = 18

_NON_ASCII = re.compile(r"[^\x00-\x7f]")

# --------------------------------------------------------------------------------------------
# Invisible and format characters
# --------------------------------------------------------------------------------------------

#: Count categories, in the order the composite reports them.
CATEGORIES = ("tag_chars", "variation_selectors", "bidi", "zero_width", "format_other",
              "control", "nfkc", "confusables", "whitespace")

# Unicode tag block ("ASCII smuggling": U+E0041 renders as nothing but reads as "A").
_TAG_RANGES = ((0xE0000, 0xE007F),)
# Variation selectors (incl. the Mongolian free variation selectors); category Mn, not Cf.
_VS_RANGES = ((0xFE00, 0xFE0F), (0xE0100, 0xE01EF), (0x180B, 0x180D), (0x180F, 0x180F))
# Bidirectional controls: embeddings/overrides, isolates, implicit marks (Trojan Source).
_BIDI_RANGES = ((0x202A, 0x202E), (0x2066, 0x2069), (0x200E, 0x200F), (0x061C, 0x061C))
# Zero-width characters and blank fillers that render as nothing: ZWSP, ZWNJ, ZWJ, word joiner,
# BOM / ZWNBSP, invisible math operators, Mongolian vowel separator, combining grapheme joiner,
# Hangul fillers (Lo, but blank, and a known smuggling carrier).
_ZW_RANGES = ((0x200B, 0x200D), (0x2060, 0x2064), (0xFEFF, 0xFEFF), (0x180E, 0x180E),
              (0x034F, 0x034F), (0x115F, 0x1160), (0x3164, 0x3164), (0xFFA0, 0xFFA0))


def _cf_code_points() -> list[int]:
    # Cf characters live in planes 0, 1 and 14 only (checked against the full range for the
    # Unicode version of this interpreter by the tests).
    cps = []
    for start, stop in ((0x80, 0x20000), (0xE0000, 0xE1000)):
        for cp, cat in zip(range(start, stop), map(unicodedata.category, map(chr, range(start, stop)))):
            if cat == "Cf":
                cps.append(cp)
    return cps


def _build_invisible_table() -> dict[int, str]:
    table: dict[int, str] = {}
    for cp in _cf_code_points():
        table[cp] = "format_other"
    for category, ranges in (("zero_width", _ZW_RANGES), ("bidi", _BIDI_RANGES),
                             ("variation_selectors", _VS_RANGES), ("tag_chars", _TAG_RANGES)):
        for lo, hi in ranges:
            for cp in range(lo, hi + 1):
                table[cp] = category
    return table


_INVISIBLE: dict[int, str] = _build_invisible_table()


def _char_class(code_points) -> str:
    """A regex character class for a set of code points (ranges merged)."""
    cps = sorted(code_points)
    parts, start, prev = [], cps[0], cps[0]
    for cp in cps[1:] + [-1]:
        if cp == prev + 1:
            prev = cp
            continue
        parts.append(f"\\U{start:08x}" if start == prev else f"\\U{start:08x}-\\U{prev:08x}")
        start = prev = cp
    return "[" + "".join(parts) + "]"


_INVISIBLE_RE = re.compile(_char_class(_INVISIBLE))


def invisible_category(char: str) -> str | None:
    """The count category :class:`InvisibleStripper` files ``char`` under, or None if kept."""
    return _INVISIBLE.get(ord(char))


# --------------------------------------------------------------------------------------------
# The single-purpose sanitizers
# --------------------------------------------------------------------------------------------


class InvisibleStripper(TextTransform):
    """Remove invisible and format characters; count = characters removed, by category.

    Categories: ``tag_chars`` (U+E0000..U+E007F), ``variation_selectors`` (U+FE00..U+FE0F,
    U+E0100..U+E01EF, U+180B..U+180D, U+180F), ``bidi`` (U+202A..U+202E, U+2066..U+2069,
    U+200E, U+200F, U+061C), ``zero_width`` (U+200B..U+200D, U+2060..U+2064, U+FEFF, U+180E,
    U+034F and the Hangul fillers U+115F, U+1160, U+3164, U+FFA0) and ``format_other`` (every
    other general-category Cf character, e.g. the soft hyphen U+00AD). Removing ZWJ and U+FE0F
    changes how some emoji render (a family becomes separate people); that is the price of
    closing the channel, and the count makes it visible.
    """

    def apply_text(self, text: str) -> tuple[str, dict[str, int]]:
        if text.isascii() or _INVISIBLE_RE.search(text) is None:
            return text, {}
        found = Counter(_INVISIBLE_RE.findall(text))
        counts: dict[str, int] = {}
        for char, n in found.items():
            category = _INVISIBLE[ord(char)]
            counts[category] = counts.get(category, 0) + n
        return _INVISIBLE_RE.sub("", text), counts


_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


class ControlStripper(TextTransform):
    """Remove C0/C1 control characters (general category Cc) except TAB, LF and CR.

    count ``control`` = characters removed.
    """

    def apply_text(self, text: str) -> tuple[str, dict[str, int]]:
        new, n = _CONTROL_RE.subn("", text)
        return (new, {"control": n}) if n else (text, {})


@functools.lru_cache(maxsize=8192)
def _nfkc_char(char: str) -> str:
    return unicodedata.normalize("NFKC", char)


def _nfkc_count(old: str, new: str) -> int:
    # Characters that NFKC maps to something else on their own, plus the characters absorbed by
    # composition across them (e.g. "e" + U+0301 -> "é" counts 1); at least 1 if anything
    # changed (pure canonical reordering of combining marks).
    unstable = 0
    per_char_len = len(old)
    for char, n in Counter(_NON_ASCII.findall(old)).items():
        norm = _nfkc_char(char)
        if norm != char:
            unstable += n
            per_char_len += n * (len(norm) - 1)
    return max(1, unstable + max(0, per_char_len - len(new)))


def _nfkc(text: str) -> tuple[str, int]:
    if text.isascii() or unicodedata.is_normalized("NFKC", text):
        return text, 0
    new = unicodedata.normalize("NFKC", text)
    return new, _nfkc_count(text, new)


class NFKCNormalizer(TextTransform):
    """Unicode NFKC normalization (fullwidth, mathematical alphanumerics, ligatures, ...).

    count ``nfkc`` = the number of characters that NFKC maps to something else on their own
    (``"Ｉｇｎｏｒｅ"`` counts 6, the ligature ``"ﬁ"`` counts 1 although it becomes two
    characters), plus the characters absorbed by canonical composition (``"e\\u0301"`` -> ``"é"``
    counts 1); at least 1 whenever the text changed. NFKC can expand: one code point becomes at
    most :data:`NFKC_MAX_EXPANSION` (18) code points.
    """

    def apply_text(self, text: str) -> tuple[str, dict[str, int]]:
        new, n = _nfkc(text)
        return (new, {"nfkc": n}) if n else (text, {})


# --------------------------------------------------------------------------------------------
# Confusables (Unicode TR39) via the `disarm` library
# --------------------------------------------------------------------------------------------

_fold_lock = threading.Lock()
_fold_table: dict[int, str] | None = None


def _build_fold_table() -> dict[int, str]:
    """Code point -> ASCII replacement, from disarm's TR39 confusables table (Latin target).

    Built once per process (about 0.2 s) by folding every non-ASCII code point through
    ``disarm.normalize_confusables`` and keeping the entries that
      * map to a non-empty, all-ASCII string (so output is ASCII and the fold is idempotent);
      * are not combining marks (an Indic anusvara is not an "o" in a Latin word);
      * are not precomposed ASCII letters with diacritics (``ç`` stays ``ç``: folding it would
        damage ordinary accented text, and NFKC could recompose it after a fold).
    disarm keeps case (Greek capital iota -> ``I``, not TR39's skeleton ``l``) and never folds
    ASCII itself, which is what downstream case-insensitive rules need.
    """
    try:
        import disarm  # runtime dependency of confusable folding only
    except ImportError as err:
        raise ImportError("confusable folding needs the 'disarm' package "
                          "(pip install 'disarm>=0.17,<1')") from err

    cps = [cp for cp in range(0x80, 0x110000) if not 0xD800 <= cp <= 0xDFFF]
    chars = [chr(cp) for cp in cps]
    folded = disarm.normalize_confusables("\x00".join(chars)).split("\x00")
    if len(folded) != len(chars):  # the NUL separators did not survive: fold one by one
        folded = [disarm.normalize_confusables(ch) for ch in chars]
    table: dict[int, str] = {}
    for cp, char, target in zip(cps, chars, folded):
        if target == char or not target or not target.isascii():
            continue
        if unicodedata.category(char).startswith("M"):
            continue
        decomposed = unicodedata.normalize("NFD", char)
        if len(decomposed) > 1 and decomposed[0].isascii():
            continue
        table[cp] = target
    return table


def fold_table() -> dict[int, str]:
    """The (lazily built, shared, read-only) confusable fold table."""
    global _fold_table
    if _fold_table is None:
        with _fold_lock:
            if _fold_table is None:
                _fold_table = _build_fold_table()
    return _fold_table


def _fold(text: str, table: dict[int, str]) -> tuple[str, int]:
    if text.isascii():
        return text, 0
    n = 0
    for char, k in Counter(_NON_ASCII.findall(text)).items():
        if ord(char) in table:
            n += k
    return (text.translate(table), n) if n else (text, 0)


class ConfusableFolder(TextTransform):
    """Fold confusable homoglyphs to ASCII using Unicode TR39 ``confusables.txt`` data.

    The mapping comes from the ``disarm`` library (TR39 visual confusables, Latin target, case
    and digits preserved: Greek ``Ι`` -> ``I``, Cyrillic ``а`` -> ``a``, ``١`` -> ``1``),
    restricted as described in :func:`_build_fold_table`. ASCII is never changed, so this is the
    TR39 prototype mapping of non-ASCII characters, not the full skeleton (which would turn
    ASCII ``m`` into ``rn`` and ``I`` into ``l``). It does rewrite legitimate Cyrillic, Greek,
    Armenian... text into look-alike Latin letters: enable it for models that expect Latin-script
    input. count ``confusables`` = characters replaced.
    """

    def __init__(self) -> None:
        self._table = fold_table()

    def apply_text(self, text: str) -> tuple[str, dict[str, int]]:
        new, n = _fold(text, self._table)
        return (new, {"confusables": n}) if n else (text, {})


_WS_ODD = re.compile(r"\s{2,}|[^\S ]")


def _collapse(text: str) -> tuple[str, int]:
    stripped = text.strip()
    count = len(text) - len(stripped)
    odd = False
    for match in _WS_ODD.finditer(stripped):
        run = match.group()
        count += len(run) - (run[0] == " ")
        odd = True
    if odd:
        stripped = " ".join(stripped.split())
    return (stripped, count) if count else (text, 0)


class WhitespaceCollapser(TextTransform):
    """Collapse every run of whitespace (``str.isspace``) to one space and strip both ends.

    count ``whitespace`` = characters removed or replaced: an inner run of length L counts L - 1
    if it starts with a plain space (that space is kept) and L otherwise; leading and trailing
    runs count their full length. ``"a \\t b"`` -> ``"a b"`` counts 2.
    """

    def apply_text(self, text: str) -> tuple[str, dict[str, int]]:
        new, n = _collapse(text)
        return (new, {"whitespace": n}) if n else (text, {})


# --------------------------------------------------------------------------------------------
# The composite
# --------------------------------------------------------------------------------------------


class UnicodeSanitizer(TextTransform):
    """Several sanitizers in one pass over each element, in this fixed order:

    1. **strip invisible** -- first, so zero-width, bidi, tag and variation-selector characters
       hidden inside a word cannot block NFKC composition, confusable folding or the detectors'
       patterns (``ig\\u200bnore``). NFKC never produces them, so one pass suffices.
    2. **strip control** -- before NFKC for the same reason; NFKC never produces them either.
    3. **NFKC** -- turns compatibility forms (fullwidth ``Ｉ``, mathematical ``𝐈``, ligatures,
       superscripts, U+3000 ideographic space) into plain characters, so that the confusable table,
       which maps the NFKC forms, sees them.
    4. **fold confusables** -- on NFKC text; if it replaced anything the text is normalized with
       NFKC again (a folded letter followed by a combining mark composes), counted as ``nfkc``.
    5. **collapse whitespace** -- last, because the earlier steps create whitespace runs (NFKC
       maps no-break and em spaces to spaces, removed invisibles leave spaces adjacent).

    Counts are keyed by category (see :data:`CATEGORIES`). The composite is idempotent.
    """

    def __init__(self, nfkc: bool = True, strip_invisible: bool = True,
                 fold_confusables: bool = False, strip_control: bool = True,
                 collapse_whitespace: bool = False):
        self.nfkc = nfkc
        self.strip_invisible = strip_invisible
        self.fold_confusables = fold_confusables
        self.strip_control = strip_control
        self.collapse_whitespace = collapse_whitespace
        self._table = fold_table() if fold_confusables else None

    def apply_text(self, text: str) -> tuple[str, dict[str, int]]:
        counts: dict[str, int] = {}
        if self.strip_invisible and not text.isascii() and _INVISIBLE_RE.search(text):
            for char, n in Counter(_INVISIBLE_RE.findall(text)).items():
                category = _INVISIBLE[ord(char)]
                counts[category] = counts.get(category, 0) + n
            text = _INVISIBLE_RE.sub("", text)
        if self.strip_control:
            text, n = _CONTROL_RE.subn("", text)
            if n:
                counts["control"] = n
        if self.nfkc:
            text, n = _nfkc(text)
            if n:
                counts["nfkc"] = n
        if self._table is not None:
            text, n = _fold(text, self._table)
            if n:
                counts["confusables"] = n
                if self.nfkc:
                    text, n = _nfkc(text)
                    if n:
                        counts["nfkc"] = counts.get("nfkc", 0) + n
        if self.collapse_whitespace:
            text, n = _collapse(text)
            if n:
                counts["whitespace"] = n
        return text, counts


# --------------------------------------------------------------------------------------------
# Caps
# --------------------------------------------------------------------------------------------


class TextLimits(Transform):
    """Reject oversize text inputs: elements per tensor, characters and UTF-8 bytes per element.

    Never changes the tensor. The :class:`InputRejected` message names the input, the element
    index (flat, row-major) and the rule, never the text.
    """
    accepts = TEXT_DATATYPES

    def __init__(self, max_bytes: int | None = None, max_chars: int | None = None,
                 max_elements: int | None = None):
        if max_bytes is None and max_chars is None and max_elements is None:
            raise ValueError("limit.text needs at least one of max_bytes, max_chars, max_elements")
        self.max_bytes = max_bytes
        self.max_chars = max_chars
        self.max_elements = max_elements

    def apply(self, array: np.ndarray, ctx: TransformContext) -> TransformResult:
        name = ctx.input_name
        if self.max_elements is not None and array.size > self.max_elements:
            raise InputRejected(f"input '{name}': {array.size} elements, cap is "
                                f"{self.max_elements}")
        if self.max_chars is None and self.max_bytes is None:
            return TransformResult(array, {})
        max_chars, max_bytes = self.max_chars, self.max_bytes
        for index, item in enumerate(array.reshape(-1)):
            if isinstance(item, (bytes, bytearray, memoryview)):
                nbytes = len(item)
                nchars = len(bytes(item).decode("utf-8", "replace")) if max_chars is not None else 0
            else:
                nchars = len(item)
                nbytes = -1  # computed only when it could break the cap
            if max_chars is not None and nchars > max_chars:
                raise InputRejected(f"input '{name}': element {index} has {nchars} characters, "
                                    f"cap is {max_chars}")
            if max_bytes is not None:
                if nbytes < 0:
                    # UTF-8 needs 1..4 bytes a code point: skip encoding when it cannot matter.
                    if 4 * nchars <= max_bytes:
                        continue
                    nbytes = len(item.encode("utf-8", "surrogatepass"))
                if nbytes > max_bytes:
                    raise InputRejected(f"input '{name}': element {index} has {nbytes} bytes "
                                        f"(UTF-8), cap is {max_bytes}")
        return TransformResult(array, {})


# --------------------------------------------------------------------------------------------
# Stage registration
# --------------------------------------------------------------------------------------------


class UnicodeOptions(StageOptions):
    nfkc: bool = True
    strip_invisible: bool = True
    # On by default, as the README promises: "іgnоrе" in Cyrillic letters reaches the detectors
    # as "ignore". Its score then counts folded letters too, so a stage that acts on counts of
    # something else (invisible characters) sets it false.
    fold_confusables: bool = True
    strip_control: bool = True
    collapse_whitespace: bool = False


class NoOptions(StageOptions):
    pass


class TextLimitOptions(StageOptions):
    max_bytes: int | None = Field(default=None, gt=0)
    max_chars: int | None = Field(default=None, gt=0)
    max_elements: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _at_least_one(self) -> "TextLimitOptions":
        if self.max_bytes is None and self.max_chars is None and self.max_elements is None:
            raise ValueError("set at least one of max_bytes, max_chars, max_elements")
        return self


register("sanitize.unicode", "transform", UnicodeOptions,
         lambda o: UnicodeSanitizer(nfkc=o.nfkc, strip_invisible=o.strip_invisible,
                                    fold_confusables=o.fold_confusables,
                                    strip_control=o.strip_control,
                                    collapse_whitespace=o.collapse_whitespace))
register("sanitize.nfkc", "transform", NoOptions, lambda o: NFKCNormalizer())
register("sanitize.invisible", "transform", NoOptions, lambda o: InvisibleStripper())
register("sanitize.confusables", "transform", NoOptions, lambda o: ConfusableFolder())
register("sanitize.control", "transform", NoOptions, lambda o: ControlStripper())
register("sanitize.whitespace", "transform", NoOptions, lambda o: WhitespaceCollapser())
register("limit.text", "transform", TextLimitOptions,
         lambda o: TextLimits(max_bytes=o.max_bytes, max_chars=o.max_chars,
                              max_elements=o.max_elements))
