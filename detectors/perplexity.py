"""The ``detect.perplexity`` stage: perplexity-style scores of a prompt under a causal LM.

The per-token NLLs come from :class:`~bastion.detectors.lm.LMRunner` (:mod:`bastion.detectors.lm`:
the graph shapes, ``lm.json``, chunking of long prompts, batching by length bucket). Concurrent
requests are gathered by one :class:`~bastion.detectors.batcher.MicroBatcher` per stage
(``max_batch``, ``max_wait_ms``), which runs the model in a worker thread.

``detect.perplexity`` scores (option ``score``; higher = more suspicious), over the prompt's
scored tokens ``nll[0..n)``:

* ``mean_nll``: mean NLL; ``ppl``: exp(mean NLL), the perplexity;
* ``windowed`` (default): the largest mean NLL of a window of ``window`` tokens, windows every
  ``stride`` tokens (``stride <= window``) and the last one ending at the prompt's end, so every
  token lies in some window; a prompt shorter than ``window`` is one window;
* ``prefix`` / ``suffix``: mean NLL of the first ``prefix_tokens`` / last ``suffix_tokens``;
* ``length_per_ppl``: Alon & Kamfonas (2023) found that perplexity alone flags short benign
  prompts and that length and perplexity together separate GCG-style attacks; with no
  classifier to fit, this is one fixed linear rule in their two features,
  ``mean NLL + log(tokens)`` = log(tokens x perplexity).

Reasons (never text): ``perplexity:window@A-B``, the most suspicious ``window``-token window
in token offsets of the prompt (half-open, prefix excluded; reported whatever the score), and
``perplexity:<score>``.

Options: ``model`` (``builtin:tiny-lm``, the bundled model: int8 on CPUs with VNNI, its
float32 original elsewhere, see ``lm.default_model_file``; ``builtin:tiny-lm/model.onnx`` or
``builtin:tiny-lm/model_int8.onnx`` for one of them on any CPU; or a folder with
``model.onnx`` + ``tokenizer.json``; or an ``.onnx`` file with ``tokenizer.json`` beside it),
``score``, ``window``, ``stride``, ``prefix_tokens``, ``suffix_tokens``, ``max_batch``,
``max_wait_ms``, ``max_queue`` (texts waiting for the model; more are shed), ``providers``
(default: ``BASTION_ONNX_PROVIDERS``, comma-separated, else CPU), ``threads`` (onnxruntime
intra-op threads), ``context`` and ``buckets`` (override ``lm.json``).
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import threading
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from bastion.core.registry import StageOptions, register
from bastion.detectors.base import TextDetector
from bastion.detectors.batcher import MicroBatcher
from bastion.detectors.lm import LMRunner, TokenNLL, get_runner, resolve_model

__all__ = ["Analysis", "PerplexityDetector", "PerplexityOptions", "SCORES", "analyze",
           "window_spans"]

SCORES = ("mean_nll", "ppl", "windowed", "prefix", "suffix", "length_per_ppl")
Score = Literal["mean_nll", "ppl", "windowed", "prefix", "suffix", "length_per_ppl"]


# --------------------------------------------------------------------------------------------
# Windows and scores (pure functions: the coverage guarantees live here)
# --------------------------------------------------------------------------------------------


def window_spans(count: int, window: int, stride: int) -> list[tuple[int, int]]:
    """Half-open windows over ``count`` items: every ``stride`` items, the last one ending at
    ``count``; with ``stride <= window`` every item lies in some window."""
    if count <= 0:
        return []
    if count <= window:
        return [(0, count)]
    starts = list(range(0, count - window, stride)) + [count - window]
    return [(s, s + window) for s in starts]


@dataclasses.dataclass(frozen=True)
class Analysis:
    score: float
    #: The most suspicious window, in the text's token offsets (half-open); None if no tokens.
    window: tuple[int, int] | None
    tokens: int


def analyze(item: TokenNLL, score: str = "windowed", window: int = 16, stride: int = 8,
            prefix_tokens: int = 32, suffix_tokens: int = 32) -> Analysis:
    nll = item.nll
    count = len(nll)
    if count == 0:
        return Analysis(0.0, None, item.tokens)
    cumulative = np.concatenate([[0.0], np.cumsum(nll, dtype=np.float64)])
    spans = window_spans(count, window, stride)
    starts = np.array([a for a, _ in spans])
    stops = np.array([b for _, b in spans])
    means = (cumulative[stops] - cumulative[starts]) / (stops - starts)
    worst = int(np.argmax(means))
    where = (int(starts[worst]) + item.first, int(stops[worst]) + item.first)
    mean = float(cumulative[-1] / count)
    if score == "windowed":
        value = float(means[worst])
    elif score == "mean_nll":
        value = mean
    elif score == "ppl":
        value = float(np.exp(mean))
    elif score == "prefix":
        value = float(np.mean(nll[:prefix_tokens]))
    elif score == "suffix":
        value = float(np.mean(nll[-suffix_tokens:]))
    elif score == "length_per_ppl":
        value = mean + float(np.log(item.tokens))
    else:
        raise ValueError(f"unknown score {score!r} (known: {', '.join(SCORES)})")
    return Analysis(value, where, item.tokens)


# --------------------------------------------------------------------------------------------
# The detector
# --------------------------------------------------------------------------------------------


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


class PerplexityDetector(TextDetector):
    """Perplexity-style scores of a prompt under a causal LM; see the module docstring."""

    is_async = True

    def __init__(self, runner: LMRunner, score: str = "windowed", window: int = 16,
                 stride: int = 8, prefix_tokens: int = 32, suffix_tokens: int = 32,
                 max_batch: int = 16, max_wait_ms: float = 2.0, cache_size: int = 1024,
                 max_queue: int | None = None):
        if score not in SCORES:
            raise ValueError(f"unknown score {score!r} (known: {', '.join(SCORES)})")
        if not 1 <= stride <= window:
            raise ValueError("stride must be between 1 and window (windows must cover every "
                             "token)")
        self.runner = runner
        self.score_name = score
        self.window, self.stride = window, stride
        self.prefix_tokens, self.suffix_tokens = prefix_tokens, suffix_tokens
        self.batcher: MicroBatcher[str, Analysis] = MicroBatcher(
            self._analyze_batch, max_batch=max_batch, max_wait_ms=max_wait_ms, threads=1,
            name=f"perplexity-{runner.name}", max_queue=max_queue)
        # Recent results by sha256 of the text, for ``reasons`` (which the pipeline calls right
        # after ``ascore`` on the worst item): the text is not kept.
        self._cache: collections.OrderedDict[bytes, Analysis] = collections.OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    @staticmethod
    def _text(item: Any) -> str:
        if isinstance(item, str):
            return item
        if isinstance(item, (bytes, bytearray, memoryview, np.bytes_)):
            return bytes(item).decode("utf-8", "replace")
        return str(item)

    def _analyze_batch(self, texts: Sequence[str]) -> list[Analysis]:
        out = [analyze(item, self.score_name, self.window, self.stride, self.prefix_tokens,
                       self.suffix_tokens) for item in self.runner.token_nll(texts)]
        with self._lock:
            for text, result in zip(texts, out):
                key = _digest(text)
                self._cache[key] = result
                self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return out

    def analyze(self, batch: Sequence[Any]) -> list[Analysis]:
        return self._analyze_batch([self._text(item) for item in batch])

    async def aanalyze(self, batch: Sequence[Any]) -> list[Analysis]:
        # One request's texts are queued together or shed together (batcher.Overloaded).
        return await self.batcher.submit_many([self._text(item) for item in batch])

    def score(self, batch: Sequence[Any]) -> np.ndarray:
        return np.array([a.score for a in self.analyze(batch)], dtype=np.float64)

    async def ascore(self, batch: Sequence[Any]) -> np.ndarray:
        return np.array([a.score for a in await self.aanalyze(batch)], dtype=np.float64)

    def reasons(self, item: Any) -> list[str]:
        text = self._text(item)
        with self._lock:
            result = self._cache.get(_digest(text))
        if result is None:
            result = self._analyze_batch([text])[0]
        if result.window is None:
            return []
        start, stop = result.window
        return [f"perplexity:window@{start}-{stop}", f"perplexity:{self.score_name}"]

    def close(self) -> None:
        self.batcher.close()


# --------------------------------------------------------------------------------------------
# Stage registration
# --------------------------------------------------------------------------------------------


class PerplexityOptions(StageOptions):
    #: ``builtin:tiny-lm``, a folder with model.onnx + tokenizer.json, or an .onnx file.
    model: str = "builtin:tiny-lm"
    score: Score = "windowed"
    window: int = Field(default=16, ge=1, le=4096)
    stride: int = Field(default=8, ge=1, le=4096)
    prefix_tokens: int = Field(default=32, ge=1)
    suffix_tokens: int = Field(default=32, ge=1)
    max_batch: int = Field(default=16, ge=1, le=1024)
    max_wait_ms: float = Field(default=2.0, ge=0, le=1000)
    #: Texts allowed to wait for the model (beyond that requests are shed; default: 8 batches,
    #: at least 128, see detectors/batcher.py).
    max_queue: int | None = Field(default=None, ge=1)
    providers: tuple[str, ...] | None = None
    threads: int = Field(default=1, ge=1, le=256)
    #: Tokens per model run (default: the model's lm.json, else 512).
    context: int | None = Field(default=None, ge=16, le=65536)
    buckets: tuple[int, ...] | None = None

    @model_validator(mode="after")
    def _stride_covers(self) -> "PerplexityOptions":
        if self.stride > self.window:
            raise ValueError("stride must be <= window (windows must cover every token)")
        return self


def build_perplexity_detector(options: PerplexityOptions) -> PerplexityDetector:
    runner = get_runner(options.model, options.providers, options.threads, options.context,
                        options.buckets)
    detector = PerplexityDetector(runner, score=options.score, window=options.window,
                                  stride=options.stride, prefix_tokens=options.prefix_tokens,
                                  suffix_tokens=options.suffix_tokens,
                                  max_batch=options.max_batch, max_wait_ms=options.max_wait_ms,
                                  max_queue=options.max_queue)
    onnx_path, tokenizer_path, _ = resolve_model(options.model)
    detector.loaded_files = (onnx_path, tokenizer_path)
    return detector


register("detect.perplexity", "detector", PerplexityOptions, build_perplexity_detector)
