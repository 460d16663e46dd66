"""Text obfuscations: the ``encoding`` family of the attack training corpus
(tools/training/corpus_attacks.py) and the threat simulator's mutators (``bastion replay
--mutate``, :mod:`bastion.replay.mutate`).

Each converter is ``fn(text, rng) -> str`` (``rng`` is a ``random.Random``; converters that need no
randomness ignore it), so the corpus builder can pick converters uniformly and stay reproducible.
They re-implement, in a few lines each, the obfuscation classes that red-team kits apply to a
harmful request or an injection payload: classic ciphers (base64, hex, rot13, Caesar, Atbash, binary,
Morse), Unicode tricks (confusables, zero-width / tag / variation-selector smuggling, fullwidth,
superscript, upside-down, combining diacritics, bidi) and text games (leetspeak, spacing, reversal,
character swaps, inserted punctuation, pig latin).  ``skeleton`` undoes the confusable mapping so
tests (and defenses) can check that a homoglyph text still *means* the original.
"""
from __future__ import annotations

import base64
import codecs
import random
import unicodedata

# --- ciphers -------------------------------------------------------------------------------------

MORSE = {
    "a": ".-", "b": "-...", "c": "-.-.", "d": "-..", "e": ".", "f": "..-.", "g": "--.", "h": "....",
    "i": "..", "j": ".---", "k": "-.-", "l": ".-..", "m": "--", "n": "-.", "o": "---", "p": ".--.",
    "q": "--.-", "r": ".-.", "s": "...", "t": "-", "u": "..-", "v": "...-", "w": ".--", "x": "-..-",
    "y": "-.--", "z": "--..", "0": "-----", "1": ".----", "2": "..---", "3": "...--", "4": "....-",
    "5": ".....", "6": "-....", "7": "--...", "8": "---..", "9": "----.", ".": ".-.-.-", ",": "--..--",
    "?": "..--..", "'": ".----.", "!": "-.-.--", "/": "-..-.", "(": "-.--.", ")": "-.--.-", ":": "---...",
    "-": "-....-", "\"": ".-..-.", "@": ".--.-.", "=": "-...-",
}


def to_base64(text: str, rng: random.Random | None = None) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def from_base64(encoded: str) -> str:
    return base64.b64decode(encoded).decode("utf-8")


def to_hex(text: str, rng: random.Random | None = None) -> str:
    return text.encode("utf-8").hex()


def to_rot13(text: str, rng: random.Random | None = None) -> str:
    return codecs.encode(text, "rot13")


def _shift_letters(text: str, shift: int) -> str:
    out = []
    for ch in text:
        if "a" <= ch <= "z":
            out.append(chr((ord(ch) - 97 + shift) % 26 + 97))
        elif "A" <= ch <= "Z":
            out.append(chr((ord(ch) - 65 + shift) % 26 + 65))
        else:
            out.append(ch)
    return "".join(out)


def to_caesar(text: str, rng: random.Random | None = None, shift: int | None = None) -> str:
    if shift is None:
        shift = (rng or random.Random(0)).choice([1, 2, 3, 4, 5, 7, 11, 19, 23, 25])
    return _shift_letters(text, shift)


def to_atbash(text: str, rng: random.Random | None = None) -> str:
    out = []
    for ch in text:
        if "a" <= ch <= "z":
            out.append(chr(219 - ord(ch)))
        elif "A" <= ch <= "Z":
            out.append(chr(155 - ord(ch)))
        else:
            out.append(ch)
    return "".join(out)


def to_binary(text: str, rng: random.Random | None = None) -> str:
    return " ".join(format(b, "08b") for b in text.encode("utf-8"))


def to_morse(text: str, rng: random.Random | None = None) -> str:
    words = text.lower().split()
    return " / ".join(" ".join(MORSE[c] for c in w if c in MORSE) for w in words)


def to_reversed(text: str, rng: random.Random | None = None) -> str:
    return text[::-1]


def to_reversed_words(text: str, rng: random.Random | None = None) -> str:
    return " ".join(reversed(text.split()))


def to_pig_latin(text: str, rng: random.Random | None = None) -> str:
    def word(w: str) -> str:
        core = w.strip(".,!?;:'\"()")
        if not core.isalpha():
            return w
        lead, trail = w[:w.find(core)], w[w.find(core) + len(core):]
        low = core.lower()
        if low[0] in "aeiou":
            pig = core + "way"
        else:
            i = next((k for k, c in enumerate(low) if c in "aeiouy" and k > 0), len(core))
            pig = core[i:] + core[:i].lower() + "ay"
        return lead + pig + trail
    return " ".join(word(w) for w in text.split())


BRAILLE = {c: chr(0x2800 + m) for c, m in zip(
    "abcdefghijklmnopqrstuvwxyz",
    [1, 3, 9, 25, 17, 11, 27, 19, 10, 26, 5, 7, 13, 29, 21, 15, 31, 23, 14, 30, 37, 39, 58, 45, 61,
     53])}


def to_braille(text: str, rng: random.Random | None = None) -> str:
    return "".join(BRAILLE.get(c, c) for c in text.lower())


# --- Unicode tricks ------------------------------------------------------------------------------

# Latin letter -> visually confusable Cyrillic/Greek letter.  NFKC leaves these alone (they are
# distinct letters, not compatibility forms), which is why they evade naive keyword filters.
HOMOGLYPHS = {
    "a": "а", "c": "с", "e": "е", "o": "о", "p": "р", "x": "х", "y": "у", "i": "і", "j": "ј",
    "s": "ѕ", "h": "һ", "d": "ԁ", "q": "ԛ", "w": "ԝ", "A": "А", "B": "В", "C": "С", "E": "Е",
    "H": "Н", "I": "І", "J": "Ј", "K": "К", "M": "М", "O": "О", "P": "Р", "S": "Ѕ", "T": "Т",
    "X": "Х", "Y": "Υ", "Z": "Ζ", "N": "Ν", "v": "ν",
}
_SKELETON = {v: k for k, v in HOMOGLYPHS.items()}


def to_homoglyphs(text: str, rng: random.Random | None = None, rate: float | None = None) -> str:
    rng = rng or random.Random(0)
    rate = rng.uniform(0.3, 1.0) if rate is None else rate
    out = [HOMOGLYPHS[c] if c in HOMOGLYPHS and rng.random() < rate else c for c in text]
    result = "".join(out)
    if result == text:  # guarantee at least one substitution when one is possible
        for k, c in enumerate(text):
            if c in HOMOGLYPHS:
                return text[:k] + HOMOGLYPHS[c] + text[k + 1:]
    return result


def skeleton(text: str) -> str:
    """Map confusables back to Latin and apply NFKC: the 'meaning' a defense should see."""
    return unicodedata.normalize("NFKC", "".join(_SKELETON.get(c, c) for c in text))


ZERO_WIDTH = ["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff"]


def to_zero_width(text: str, rng: random.Random | None = None) -> str:
    rng = rng or random.Random(0)
    marks = rng.sample(ZERO_WIDTH, rng.randint(1, 3))
    per_char = rng.random() < 0.5
    out = []
    for ch in text:
        out.append(ch)
        if per_char or ch == " " or rng.random() < 0.3:
            out.append(rng.choice(marks))
    return "".join(out)


def strip_invisible(text: str) -> str:
    return "".join(c for c in text if c not in ZERO_WIDTH and not 0xE0000 <= ord(c) <= 0xE007F
                   and not 0xFE00 <= ord(c) <= 0xFE0F and not 0xE0100 <= ord(c) <= 0xE01EF)


def to_unicode_tags(text: str, rng: random.Random | None = None) -> str:
    """ASCII smuggled as invisible Unicode tag characters (U+E0000 block)."""
    return "".join(chr(0xE0000 + ord(c)) if ord(c) < 128 else c for c in text)


def from_unicode_tags(text: str) -> str:
    return "".join(chr(ord(c) - 0xE0000) if 0xE0000 <= ord(c) <= 0xE007F else c for c in text)


def to_variation_selectors(text: str, rng: random.Random | None = None) -> str:
    """Each UTF-8 byte as a variation selector riding on one visible carrier character."""
    rng = rng or random.Random(0)
    carrier = rng.choice(["😊", "✨", "🙂", "a", "*", "👍", "🔒"])
    sel = []
    for b in text.encode("utf-8"):
        sel.append(chr(0xFE00 + b) if b < 16 else chr(0xE0100 + b - 16))
    return carrier + "".join(sel)


def from_variation_selectors(text: str) -> str:
    data = []
    for c in text:
        o = ord(c)
        if 0xFE00 <= o <= 0xFE0F:
            data.append(o - 0xFE00)
        elif 0xE0100 <= o <= 0xE01EF:
            data.append(o - 0xE0100 + 16)
    return bytes(data).decode("utf-8")


def to_fullwidth(text: str, rng: random.Random | None = None) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else ("\u3000" if c == " " else c)
                   for c in text)


SUPERSCRIPT = dict(zip("abcdefghijklmnoprstuvwxyzABDEGHIJKLMNOPRTUVW0123456789",
                       "ᵃᵇᶜᵈᵉᶠᵍʰⁱʲᵏˡᵐⁿᵒᵖʳˢᵗᵘᵛʷˣʸᶻᴬᴮᴰᴱᴳᴴᴵᴶᴷᴸᴹᴺᴼᴾᴿᵀᵁⱽᵂ⁰¹²³⁴⁵⁶⁷⁸⁹"))


def to_superscript(text: str, rng: random.Random | None = None) -> str:
    return "".join(SUPERSCRIPT.get(c, c) for c in text)


UPSIDE_DOWN = dict(zip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,!?'",
                       "ɐqɔpǝɟƃɥᴉɾʞlɯuodbɹsʇnʌʍxʎz∀ᗺƆᗡƎℲ⅁HIſꓘ˥WNOԀΌᴚS⊥∩ΛMX⅄Z˙'¡¿,"))


def to_upside_down(text: str, rng: random.Random | None = None) -> str:
    return "".join(UPSIDE_DOWN.get(c, c) for c in reversed(text))


COMBINING = ["\u0300", "\u0301", "\u0302", "\u0303", "\u0304", "\u0306", "\u0308", "\u030a",
             "\u030c", "\u0327", "\u0328", "\u0331", "\u0336"]


def to_diacritics(text: str, rng: random.Random | None = None) -> str:
    rng = rng or random.Random(0)
    heavy = rng.random() < 0.3  # "zalgo"-style stacking sometimes
    out = []
    for ch in text:
        out.append(ch)
        if ch.isalpha() and rng.random() < (0.9 if heavy else 0.5):
            out.extend(rng.choice(COMBINING) for _ in range(rng.randint(2, 4) if heavy else 1))
    return "".join(out)


def to_bidi(text: str, rng: random.Random | None = None) -> str:
    """Right-to-left override around the reversed text: displays forwards, stored backwards."""
    return "\u202e" + text[::-1] + "\u202c"


# --- text games ----------------------------------------------------------------------------------

LEET = {"a": ["4", "@"], "e": ["3"], "i": ["1", "!"], "o": ["0"], "s": ["5", "$"], "t": ["7"],
        "l": ["1", "|"], "g": ["9"], "b": ["8"], "z": ["2"]}


def to_leetspeak(text: str, rng: random.Random | None = None) -> str:
    rng = rng or random.Random(0)
    rate = rng.uniform(0.5, 1.0)
    return "".join(rng.choice(LEET[c.lower()]) if c.lower() in LEET and rng.random() < rate else c
                   for c in text)


def to_spaced(text: str, rng: random.Random | None = None) -> str:
    rng = rng or random.Random(0)
    sep = rng.choice([" ", "  ", "-", ".", "_", "*", " | "])
    return (" " * 3 if sep == " " else " ").join(sep.join(w) for w in text.split())


def to_char_swaps(text: str, rng: random.Random | None = None) -> str:
    rng = rng or random.Random(0)

    def swap(w: str) -> str:
        if len(w) < 4 or not w.isalpha() or rng.random() < 0.4:
            return w
        k = rng.randint(1, len(w) - 3)
        return w[:k] + w[k + 1] + w[k] + w[k + 2:]
    return " ".join(swap(w) for w in text.split())


def to_inserted_punctuation(text: str, rng: random.Random | None = None) -> str:
    rng = rng or random.Random(0)
    marks = rng.sample(list(".,;:-_*'`~^|/"), 3)
    out = []
    for w in text.split():
        if len(w) > 2 and rng.random() < 0.6:
            k = rng.randint(1, len(w) - 1)
            w = w[:k] + rng.choice(marks) + w[k:]
        out.append(w)
    return " ".join(out)


def to_alternating_case(text: str, rng: random.Random | None = None) -> str:
    return "".join(c.upper() if k % 2 else c.lower() for k, c in enumerate(text))


def to_first_letters(text: str, rng: random.Random | None = None) -> str:
    """Acrostic: the request is spelled by the first letters of filler words."""
    rng = rng or random.Random(0)
    fill = {}
    for w in ["apple", "blue", "cat", "dance", "eagle", "forest", "green", "house", "ice", "jump",
              "kite", "lemon", "moon", "night", "ocean", "paper", "quiet", "river", "sun", "tree",
              "under", "violet", "water", "xenon", "yellow", "zebra"]:
        fill[w[0]] = w
    letters = [c for c in text.lower() if c in fill or c == " "]
    words = [fill[c] if c != " " else "/" for c in letters]
    return " ".join(words)


CIPHERS = {"base64": to_base64, "hex": to_hex, "rot13": to_rot13, "caesar": to_caesar,
           "atbash": to_atbash, "binary": to_binary, "morse": to_morse, "reversed": to_reversed,
           "reversed_words": to_reversed_words, "pig_latin": to_pig_latin, "braille": to_braille}
UNICODE_TRICKS = {"homoglyph": to_homoglyphs, "zero_width": to_zero_width,
                  "unicode_tags": to_unicode_tags, "variation_selectors": to_variation_selectors,
                  "fullwidth": to_fullwidth, "superscript": to_superscript,
                  "upside_down": to_upside_down, "diacritics": to_diacritics, "bidi": to_bidi}
TEXT_GAMES = {"leetspeak": to_leetspeak, "spaced": to_spaced, "char_swaps": to_char_swaps,
              "inserted_punctuation": to_inserted_punctuation,
              "alternating_case": to_alternating_case, "first_letters": to_first_letters}

# How a prompt names each encoding when it asks the model to decode it.
ENCODING_NAMES = {"base64": "Base64", "hex": "hex", "rot13": "ROT13", "caesar": "Caesar cipher",
                  "atbash": "Atbash", "binary": "binary", "morse": "Morse code",
                  "reversed": "reversed text", "reversed_words": "reversed word order",
                  "pig_latin": "Pig Latin", "braille": "Braille", "homoglyph": "obfuscated text",
                  "zero_width": "obfuscated text", "unicode_tags": "hidden text",
                  "variation_selectors": "hidden bytes", "fullwidth": "wide text",
                  "superscript": "small text", "upside_down": "upside-down text",
                  "diacritics": "accented text", "bidi": "right-to-left text", "leetspeak": "leetspeak",
                  "spaced": "spaced-out text", "char_swaps": "scrambled text",
                  "inserted_punctuation": "punctuated text", "alternating_case": "mixed-case text",
                  "first_letters": "acrostic (first letters)"}
