"""Incremental output scanning with a hold-back window: what a model generates is checked for
leaked canaries and secret text, secrets and PII before the client sees it, chunk by chunk.

Build an :class:`OutputScanner` once per configuration (it compiles and validates the
matchers, see :func:`build_matchers`), then take one :class:`OutputGuard` per response::

    scanner = OutputScanner(build_matchers(canaries=["ZX-CANARY-41"], pii="redact"))
    guard = scanner.guard()
    for chunk in upstream_chunks:
        release = guard.feed(chunk, final=chunk_is_last)
        send(release.text)                 # may be "" while text is held back
        if release.stop:
            end_stream_with_error(release.findings)
            break

    scanner.scan(full_text)                # a unary response: the same guard, one feed

Hold-back rule: after each non-final ``feed`` the guard has released everything except at most
the last ``holdback_chars`` characters of the text so far (fewer where a redaction reached
further). ``holdback_chars`` is at least every matcher's ``max_span`` (the most characters one
match attempt reads), so any match, including one that spans chunk boundaries, lies whole in the
text the guard has seen before any character of it would be released: released text is final
and never taken back. The final feed (``final=True``, or :meth:`OutputGuard.finish`) releases
the rest. The released text, concatenated over a stream, is the same however the stream was cut
into chunks, and equals ``scanner.scan`` of the whole text (the tests check this).

Redaction replaces each match with ``marker`` (``[REDACTED:<label>]``); everything else passes
byte for byte. Some secrets redact past their match (the rest of a long token, a PEM block's
body up to its END line). Where matches of different rules overlap, the leftmost (then the rule
listed first: canaries, specific secrets, private keys, high entropy, PII) is redacted and the
part of any other that reaches past it gets its own marker; a ``stop`` match is never hidden by
a redaction.

Stop: the release that reports ``stop`` carries the clean text before the offending match (with
``release_before_stop``, the default; else nothing more) and no character of the match or after
it; the caller ends the stream with an error. Later feeds release nothing. A match is decided
once the window has passed its start, so the stop comes at most ``holdback_chars`` characters
after the match began (or with the final feed), and always before any of it is released.

Cost: a matcher searches again only once the window has moved past where it last looked, so
matchers much shorter than the window search rarely; a ``holdback_chars`` a little above the
default trades time to first token for CPU (``bench/bench_output_scan.py``).

Chunk structure (:func:`relay`): the guard answers every input chunk with one output chunk, so a
relay can keep one response per upstream response: while text is held back an output chunk is
shorter than its input chunk or empty; the final input chunk carries the flush of everything
held back. A stream whose final response has no text (Triton's empty final response) gets the
flush in that final response. After a stop, no further chunk is produced.

Text: chunks are ``str``, or ``bytes`` of UTF-8 decoded incrementally (a character split across
chunks is held until it is complete; invalid bytes pass through as surrogate escapes, so
:attr:`Release.data` gives back the same bytes). Offsets in findings count characters (code
points) of the text as generated.
"""
from __future__ import annotations

import codecs
import dataclasses
import heapq
from collections.abc import Iterable, Iterator, Sequence

from bastion.detectors.output_canary import canary_matchers
from bastion.detectors.output_match import (MAX_LOOKBEHIND, Action, Extension, Finding, Hit,
                                            Matcher, as_action)
from bastion.detectors.output_rules import pii_matchers, secret_matchers

DEFAULT_MARKER = "[REDACTED:{label}]"


@dataclasses.dataclass(frozen=True)
class Release:
    """What one feed lets through: ``text`` is safe to send now (redactions applied; may be
    empty), ``findings`` were decided by this feed (a redaction's comes with its marker, a
    stop's with the stop), ``stop`` says to end the stream with
    an error (it stays true on every later release), ``final`` that the guard is done."""
    text: str = ""
    findings: tuple[Finding, ...] = ()
    stop: bool = False
    final: bool = False

    @property
    def data(self) -> bytes:
        return self.text.encode("utf-8", "surrogateescape")

    @property
    def stop_finding(self) -> Finding | None:
        return next((f for f in self.findings if f.action is Action.STOP), None)


def build_matchers(*, canaries: Iterable[str] = (), secret_texts: Iterable[str] = (),
                   canary_action: Action | str = Action.STOP,
                   secrets: Action | str | None = Action.REDACT,
                   pii: Action | str | None = Action.REDACT,
                   pii_kinds: Iterable[str] = ("email", "phone", "card"),
                   secret_rules: Iterable[str] | None = None, high_entropy: bool = True,
                   shingle_words: int = 3, window_words: int = 10,
                   leak_threshold: float = 0.6) -> list[Matcher]:
    """The standard matchers, canaries first: ``secrets``/``pii`` set the action of their group
    (``None`` leaves the group out)."""
    out = canary_matchers(canaries, secret_texts, action=canary_action,
                          shingle_words=shingle_words, window_words=window_words,
                          threshold=leak_threshold)
    if secrets is not None:
        out += secret_matchers(secrets, entropy=high_entropy, rules=secret_rules)
    if pii is not None:
        out += pii_matchers(pii, pii_kinds)
    return out


class OutputScanner:
    """Immutable, shareable configuration: the matchers and the hold-back window.

    ``holdback_chars`` defaults to the largest matcher ``max_span``; a smaller value is refused
    (it would let a match that spans chunks out half-released). ``marker`` is formatted with
    ``label`` and ``kind``. ``release_before_stop``: whether the release that stops carries the
    clean text before the offending match."""

    def __init__(self, matchers: Sequence[Matcher], *, holdback_chars: int | None = None,
                 marker: str = DEFAULT_MARKER, release_before_stop: bool = True):
        self.matchers = tuple(matchers)
        for m in self.matchers:
            as_action(m.action)
            if m.max_span < 1 or m.lookbehind > MAX_LOOKBEHIND:
                raise ValueError(f"matcher {m.name}: max_span {m.max_span}, "
                                 f"lookbehind {m.lookbehind}")
        needed = max((m.max_span for m in self.matchers), default=0)
        if holdback_chars is None:
            holdback_chars = needed
        if holdback_chars < needed:
            widest = max(self.matchers, key=lambda m: m.max_span)
            raise ValueError(f"holdback_chars {holdback_chars} is shorter than matcher "
                             f"{widest.name}'s span {needed}")
        self.holdback_chars = holdback_chars
        self.markers = tuple(marker.format(label=m.label, kind=m.kind) for m in self.matchers)
        self.release_before_stop = release_before_stop

    def guard(self) -> "OutputGuard":
        return OutputGuard(self)

    def scan(self, text: str | bytes) -> Release:
        """A whole (unary) response: one final feed."""
        return self.guard().feed(text, final=True)


class OutputGuard:
    """The per-response state. ``feed(chunk, final=False) -> Release``; ``finish()`` is
    ``feed("", final=True)``. Not thread-safe: one guard per stream."""

    def __init__(self, scanner: OutputScanner):
        self._scanner = scanner
        self._matchers = scanner.matchers
        self._hold = scanner.holdback_chars
        self._text = ""          # the text from absolute offset self._off to self._n
        self._off = 0
        self._n = 0
        self._released = 0       # input consumed (released or redacted) up to here
        # per matcher: where its next search starts (end of its last decided hit) and the
        # position before which it is known to have no further hit
        self._resume = [0] * len(self._matchers)
        self._clean = [0] * len(self._matchers)
        # (max(resume, clean), index): the matchers by where their next search would start
        self._due = [(0, i) for i in range(len(self._matchers))]
        self._ext: Extension | None = None   # a redaction still going on past its match
        self._decoder = None
        self.stopped = False
        self.finished = False

    @property
    def pending_chars(self) -> int:
        """Characters received and not yet released (nor redacted)."""
        return self._n - self._released

    def finish(self) -> Release:
        return self.feed("", final=True)

    def feed(self, chunk: str | bytes, final: bool = False) -> Release:
        if self.finished:
            raise RuntimeError("feed after the final feed")
        if final:
            self.finished = True
        if self.stopped:
            return Release("", (), True, final)
        text = self._decode(chunk, final)
        if text:
            self._text += text
            self._n += len(text)
        out: list[str] = []
        findings: list[Finding] = []
        stop = self._scan(out, findings, final)
        self._trim()
        return Release("".join(out), tuple(findings), stop, final)

    # -- internals ------------------------------------------------------------------------------

    def _decode(self, chunk: str | bytes, final: bool) -> str:
        if isinstance(chunk, str):
            if self._decoder is None or not self._decoder.getstate()[0]:
                return chunk
            if chunk:
                raise ValueError("str chunk fed while a UTF-8 character is incomplete")
            chunk = b""
        if self._decoder is None:
            self._decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        return self._decoder.decode(bytes(chunk), final)

    def _scan(self, out: list[str], findings: list[Finding], final: bool) -> bool:
        text, off, n = self._text, self._off, self._n
        matchers, scanner = self._matchers, self._scanner
        pos = self._released
        if self._ext is not None:
            pos = self._advance_extension(pos, final)
        decided = n if final else max(0, n - self._hold)
        candidates: list[tuple[int, int, Hit]] = []
        due, searched = self._due, []
        while due and due[0][0] < decided:   # the matchers with something to decide
            searched.append(heapq.heappop(due))
        for at, i in searched:
            m = matchers[i]
            resume, clean = self._resume[i], self._clean[i]
            while True:
                hit = m.search(text, at - off)
                if hit is None:
                    clean = max(clean, n - m.max_span + 1)
                    break
                hit = Hit(hit.anchor + off, hit.start + off, hit.end + off, hit.resume + off)
                if hit.start >= decided:
                    clean = max(clean, min(hit.anchor, n - m.max_span + 1))
                    break
                candidates.append((hit.start, i, hit))
                resume = at = hit.resume
            self._resume[i], self._clean[i] = resume, clean
        for _, i in searched:
            heapq.heappush(due, (max(self._resume[i], self._clean[i]), i))
        candidates.sort()
        for start, i, hit in candidates:
            m = matchers[i]
            if m.action is Action.STOP:
                if not scanner.release_before_stop:
                    out.clear()
                elif start > pos and self._ext is None:
                    out.append(text[pos - off:start - off])
                self._ext = None
                findings.append(Finding(m.kind, m.name, m.label, Action.STOP, start, hit.end))
                self._released = max(pos, start)
                self.stopped = True
                return True
            if self._ext is not None or hit.end <= pos:
                continue            # inside an open extension, or redacted already
            cut = max(start, pos)
            out.append(text[pos - off:cut - off])
            out.append(scanner.markers[i])
            pos = hit.end
            findings.append(Finding(m.kind, m.name, m.label, Action.REDACT, start, pos))
            self._ext = m.extension()
            if self._ext is not None:
                pos = self._advance_extension(pos, final)
        if self._ext is None and decided > pos:
            out.append(text[pos - off:decided - off])
            pos = decided
        self._released = pos
        return False

    def _advance_extension(self, pos: int, final: bool) -> int:
        end, done = self._ext.advance(self._text, pos - self._off, final)
        if done:
            self._ext = None
        return end + self._off

    def _trim(self) -> None:
        # Keep what a search may still start from (every matcher resumes at or after
        # decided - holdback), its lookbehind, and what is not released.
        keep = min(self._released, self._n - self._hold) - self._hold - MAX_LOOKBEHIND
        if keep - self._off > max(4 * self._hold, 4096):
            self._text = self._text[keep - self._off:]
            self._off = keep


def relay(guard: OutputGuard, chunks: Iterable[str | bytes]) -> Iterator[Release]:
    """One release per input chunk, in order; the last chunk is fed with ``final=True`` (the
    flush of held-back text goes with it). Stops after the release that says ``stop``. An empty
    ``chunks`` finishes the guard and yields nothing."""
    iterator = iter(chunks)
    try:
        current = next(iterator)
    except StopIteration:
        guard.finish()
        return
    for following in iterator:
        release = guard.feed(current)
        yield release
        if release.stop:
            return
        current = following
    yield guard.feed(current, final=True)
