"""The ``detect.signatures`` stage: known prompt-injection and jailbreak phrasings, matched by
regex rules loaded from YAML, also inside base64 / hex / URL-encoded / rot13 / leetspeak
payloads.

The rules, their file format and the windowed search live in
:mod:`bastion.detectors.signature_rules`, the decoders in
:mod:`bastion.detectors.signature_decoders`.

Scoring: :meth:`SignatureDetector.score` is the largest weight of the rules that match the text
or a decoding of it (0.0 if none); :meth:`SignatureDetector.reasons` lists
``signature:<rule id>`` for each rule matched and ``encoded:<scheme>`` for each scheme a match
had to be decoded through. Neither ever contains input text.

Cost bounds (per text), besides each rule's (keywords, match width, windows) and each decoder's
own: at most ``max_decode_depth`` (<= 2) nested decodings, whole-text schemes at depth 2 only
on candidates of at most ``MAX_NESTED_WHOLE_CHARS`` characters, and ``4 * len(text) + 65536``
decoded characters in all. A decoding is rescanned only near what it changed (a match elsewhere
was a match before).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from bastion.core.registry import StageOptions, register
from bastion.detectors.base import TextDetector
from bastion.detectors.signature_decoders import DECODERS, SCHEMES, WHOLE_TEXT_SCHEMES, Scheme
from bastion.detectors.signature_rules import (Rule, default_rules_path, fold_case, load_rules,
                                               match_width, search_rule)

__all__ = ["SignatureDetector", "SignatureOptions", "build_signature_detector"]

MAX_NESTED_WHOLE_CHARS = 65536


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
        unknown = [s for s in decode if s not in DECODERS]
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
        self._max_width = max(match_width(rule.regex.pattern, rule.regex.flags)[1]
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
        folded = fold_case(text)  # same length as text: _PREFOLD removed the one expanding case
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
            if any(search_rule(rule, target, a, b) for a, b in ranges):
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
                    for decoded, regions in DECODERS[scheme](candidate):
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
    detector = SignatureDetector(load_rules(options.rules), decode=options.decode,
                                 max_decode_depth=options.max_decode_depth)
    detector.loaded_files = (Path(options.rules) if options.rules else default_rules_path(),)
    return detector


register("detect.signatures", "detector", SignatureOptions, build_signature_detector)
