"""Canary-leak matchers for output scanning: a leaked canary or secret text means an injection
worked (see ``output_match`` for the matcher contract).

* :func:`canary_matcher`: a configured canary string (the application puts it in its system
  prompt), found exactly but case-insensitively anywhere in the output.
* :class:`ShingleMatcher`: a configured secret text such as the whole system prompt, found
  fuzzily: ``window_words`` consecutive output words of which at least ``threshold`` of the
  word ``shingle_words``-grams (lower-cased, punctuation ignored) occur in the secret text. A
  verbatim copy of any ``window_words`` words of the secret matches; so does a copy with a word
  or two changed, reflowed, or re-punctuated; ordinary text that shares a few phrases with the
  prompt ("you are a helpful assistant") does not.

Both default to ``stop``. Findings name the canary or text by its index in the configuration
(``canary:0``, ``secret_text:1``) and never contain it.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable

from bastion.detectors.output_match import Action, Extension, Hit, RegexMatcher, as_action

WORD = re.compile(r"(?<!\w)\w+")


def canary_matcher(canary: str, index: int = 0,
                   action: Action | str = Action.STOP) -> RegexMatcher:
    if not canary or not canary.strip():
        raise ValueError("a canary must be a non-empty string")
    return RegexMatcher(f"canary:{index}", "canary", re.compile(re.escape(canary), re.IGNORECASE),
                        as_action(action), label="canary")


class ShingleMatcher:
    """Fuzzy leak of one secret text. ``max_span`` bounds the characters a matching window may
    cover (default: the widest ``window_words`` run in the secret text, plus a quarter, plus two
    characters a word for other spacing and punctuation); a wider window never matches, which is
    what bounds the guard's hold-back window."""

    kind = "canary"
    lookbehind = 1

    def __init__(self, text: str, *, index: int = 0, action: Action | str = Action.STOP,
                 shingle_words: int = 3, window_words: int = 10, threshold: float = 0.6,
                 max_span: int | None = None):
        if not 0 < threshold <= 1:
            raise ValueError("secret text: threshold must be in (0, 1]")
        if shingle_words < 1 or window_words < shingle_words:
            raise ValueError("secret text: need 1 <= shingle_words <= window_words")
        words = list(WORD.finditer(text))
        if len(words) < shingle_words:
            raise ValueError(f"secret text {index}: fewer than {shingle_words} words; "
                             "configure it as a canary instead")
        self.name = f"secret_text:{index}"
        self.label = "secret_text"
        self.action = as_action(action)
        self._n = n = shingle_words
        self._w = w = min(window_words, len(words))
        keys = [m.group().casefold() for m in words]
        self._shingles = frozenset(tuple(keys[i:i + n]) for i in range(len(keys) - n + 1))
        self._need = max(1, math.ceil(threshold * (w - n + 1) - 1e-9))
        widest = max(words[i + w - 1].end() - words[i].start() for i in range(len(words) - w + 1))
        self._extent = (max_span - 1) if max_span else widest + widest // 4 + 2 * w
        if self._extent < 1:
            raise ValueError("secret text: max_span too small")
        self.max_span = self._extent + 1     # + the character that ends the last word

    def search(self, text: str, pos: int) -> Hit | None:
        words = list(WORD.finditer(text, pos))
        n, w, need, extent, shingles = self._n, self._w, self._need, self._extent, self._shingles
        if len(words) < w:
            return None
        keys = [m.group().casefold() for m in words]
        hits = [tuple(keys[i:i + n]) in shingles for i in range(len(keys) - n + 1)]
        per_window = w - n + 1
        count = sum(hits[:per_window])
        for i in range(len(words) - w + 1):
            if i:
                count += hits[i + per_window - 1] - hits[i - 1]
            if count >= need:
                start, end = words[i].start(), words[i + w - 1].end()
                if end - start <= extent:
                    return Hit(start, start, end, end)
        return None

    def extension(self) -> Extension | None:
        return None


def canary_matchers(canaries: Iterable[str] = (), secret_texts: Iterable[str] = (), *,
                    action: Action | str = Action.STOP, shingle_words: int = 3,
                    window_words: int = 10, threshold: float = 0.6) -> list:
    out: list = [canary_matcher(c, i, action) for i, c in enumerate(canaries)]
    out += [ShingleMatcher(t, index=i, action=action, shingle_words=shingle_words,
                           window_words=window_words, threshold=threshold)
            for i, t in enumerate(secret_texts)]
    return out
