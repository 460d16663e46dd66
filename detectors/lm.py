"""Causal language models on ONNX Runtime: the per-token NLL of a text.

:class:`LMRunner` runs a causal LM exported to ONNX with its ``tokenizer.json`` (loaded by the
``tokenizers`` library) and returns the per-token negative log-likelihood (NLL) of each text.
Two graph shapes are accepted, told apart by the graph's outputs:

* the standard Hugging Face export: ``input_ids`` + ``attention_mask`` [batch, seq] int64 ->
  ``logits`` [batch, seq, vocab]; the runner computes log-softmax and picks the next token's
  log-probability (in chunks, so the [batch, seq, vocab] copy stays bounded);
* a graph that outputs the per-token NLL itself: output ``nll`` [batch, seq], column ``t`` =
  -log p(token t | tokens < t), column 0 = 0 (the bundled tiny LM and ``bastion models export
  smollm2`` write this: no [batch, seq, vocab] tensor ever leaves the graph).

A graph input ``position_ids`` is fed ``0..seq-1``. Optional ``lm.json`` beside the model:
``default_model`` (the file a folder means, default ``model.onnx``), ``context`` (tokens per
run, default 512), ``overlap`` (default context / 4), ``prefix`` (text put before every prompt
and never scored, e.g. a BOS token ``<|endoftext|>`` or a chat header ``<|im_start|>user\\n``;
with a prefix every prompt token is scored, without one the first token has no context and is
not), ``pad_id`` (default 0).

Long prompts are never truncated. A prompt (with its prefix) longer than ``context`` tokens is
run as overlapping chunks of ``context`` tokens starting every ``context - overlap`` tokens (the
last chunk ends at the prompt's end); each token's NLL is taken from exactly one chunk, in which
it has at least ``overlap`` tokens of context, and the per-token NLLs are joined, so every
score and window of ``detect.perplexity`` (:mod:`bastion.detectors.perplexity`) covers the
whole prompt.

Batching: rows (chunks) are padded on the right to their length bucket (``buckets``; default
16, 32, ..., 512), rows of one bucket run together, at most ``max_tokens`` tokens per
onnxruntime call. Causal attention makes right padding invisible to the real tokens, so a
text's NLL does not depend on what it is batched with (up to float rounding).

:func:`get_runner` shares one runner (one onnxruntime session) per model and settings;
``providers`` default to ``BASTION_ONNX_PROVIDERS`` (comma-separated), else CPU.
"""
from __future__ import annotations

import bisect
import collections
import dataclasses
import importlib.resources
import json
import logging
import os
import pathlib
import threading
from collections.abc import Sequence

import numpy as np

from bastion.detectors.cpu_features import has_int8_dot_product

__all__ = ["LMRunner", "TokenNLL", "chunk_plan", "get_runner", "resolve_model",
           "default_providers", "default_model_file", "nll_from_logits", "DEFAULT_BUCKETS"]

log = logging.getLogger("bastion.lm")

PROVIDERS_ENV = "BASTION_ONNX_PROVIDERS"
DEFAULT_BUCKETS = (16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 192, 224, 256, 320, 384, 448, 512)
DEFAULT_CONTEXT = 512
MAX_TOKENS_PER_RUN = 8192
# A logits graph materializes [rows, seq, vocab] float32: at most this many floats per run.
MAX_LOGITS_PER_RUN = 1 << 26


def default_providers() -> list[str]:
    value = os.environ.get(PROVIDERS_ENV, "").strip()
    if value:
        return [p.strip() for p in value.split(",") if p.strip()]
    return ["CPUExecutionProvider"]


def default_model_file(config: dict, flags: Sequence[str] | None = None) -> str:
    """The file a folder's ``lm.json`` names to run: ``default_model``, except on a CPU without
    8-bit dot-product instructions (VNNI), where ``default_model_without_vnni`` (if given) wins.

    Why: onnxruntime's uint8 x int8 QLinearMatMul uses VNNI's ``vpdpbusd`` where it exists and
    AVX2's ``vpmaddubsw`` otherwise, which saturates pairs of products at int16; the bundled
    int8 tiny LM tracks its float32 original within 0.05 nats mean NLL with VNNI but was
    measured 0.0645 off on an AVX2-only AMD EPYC (issue 17). The float32 model scores the same
    on every CPU, so thresholds calibrated on either CPU kind keep their meaning."""
    fallback = config.get("default_model_without_vnni")
    if fallback and not has_int8_dot_product(flags):
        return fallback
    return config.get("default_model", "model.onnx")


def resolve_model(model: str | os.PathLike) -> tuple[pathlib.Path, pathlib.Path, dict]:
    """(model file, tokenizer.json, lm.json contents) for ``builtin:NAME[/FILE]``, a folder
    (its lm.json ``default_model``, else ``model.onnx``) or an .onnx file."""
    text = str(model)
    if text.startswith("builtin:"):
        name, _, file = text.removeprefix("builtin:").partition("/")
        root = pathlib.Path(str(importlib.resources.files("bastion") / "lm"))
        path = root / name
        if not name or not path.is_dir() or "/" in file or file in ("..", "."):
            known = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
            raise ValueError(f"unknown builtin model {text!r} (builtin: "
                             f"{', '.join('builtin:' + k for k in known) or 'none'})")
        if file:
            path = path / file
    else:
        path = pathlib.Path(text)
    folder = path if path.is_dir() else path.parent
    manifest = folder / "lm.json"
    config = json.loads(manifest.read_text()) if manifest.exists() else {}
    onnx_path = path / default_model_file(config) if path.is_dir() else path
    if not onnx_path.exists():
        raise FileNotFoundError(f"language model {onnx_path} does not exist (export one with "
                                "`bastion models export smollm2 --out DIR`)")
    tokenizer = folder / "tokenizer.json"
    if not tokenizer.exists():
        raise FileNotFoundError(f"no tokenizer.json next to {onnx_path}")
    return onnx_path, tokenizer, config


# --------------------------------------------------------------------------------------------
# Chunks (a pure function: the coverage guarantee lives here)
# --------------------------------------------------------------------------------------------


def chunk_plan(length: int, context: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Chunks for a sequence of ``length`` tokens: (start, stop, own_from, own_to).

    Each chunk is ``seq[start:stop]`` (at most ``context`` tokens); it supplies the NLL of the
    positions ``own_from <= t < own_to``. Positions 1..length-1 are each owned by exactly one
    chunk, with at least ``overlap`` tokens of context in it (except in the first chunk).
    """
    if length < 2:
        return []
    if length <= context:
        return [(0, length, 1, length)]
    if not 0 <= overlap < context:
        raise ValueError("overlap must be in [0, context)")
    step = context - overlap
    starts = list(range(0, length - context, step)) + [length - context]
    plan, owned = [], 1
    for start in starts:
        stop = start + context
        if stop > owned:
            plan.append((start, stop, owned, stop))
            owned = stop
    return plan


@dataclasses.dataclass(frozen=True)
class TokenNLL:
    """Per-token NLL of one text: ``nll[j]`` is -log p of text token ``first + j``."""
    nll: np.ndarray
    first: int
    tokens: int


# --------------------------------------------------------------------------------------------
# The runner
# --------------------------------------------------------------------------------------------


class LMRunner:
    """Tokenizer + causal LM on onnxruntime: ``token_nll(texts)`` (blocking, thread-safe)."""

    def __init__(self, model: str | os.PathLike, providers: Sequence[str] | None = None,
                 threads: int = 1, context: int | None = None,
                 buckets: Sequence[int] | None = None, max_tokens: int = MAX_TOKENS_PER_RUN):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.model_path, tokenizer_path, self.config = resolve_model(model)
        self.name = self.config.get("name") or self.model_path.parent.name
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.context = int(context or self.config.get("context") or DEFAULT_CONTEXT)
        self.overlap = int(self.config.get("overlap", self.context // 4))
        if self.context < 8 or not 0 <= self.overlap < self.context:
            raise ValueError(f"bad context {self.context} / overlap {self.overlap}")
        self.pad_id = int(self.config.get("pad_id", 0))
        prefix = self.config.get("prefix") or ""
        self.prefix_ids: list[int] = (self.tokenizer.encode(prefix, add_special_tokens=False).ids
                                      if prefix else [])
        if len(self.prefix_ids) >= self.context:
            raise ValueError("the prefix does not fit the context")
        wanted = sorted({int(b) for b in (buckets or DEFAULT_BUCKETS) if 0 < int(b) < self.context})
        self.buckets = wanted + [self.context]

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, int(threads))
        options.inter_op_num_threads = 1
        wanted_providers = list(providers) if providers else default_providers()
        available = set(ort.get_available_providers())
        chosen = [p for p in wanted_providers if p in available] or ["CPUExecutionProvider"]
        if chosen != wanted_providers:
            log.warning("onnx providers %s not available; using %s", wanted_providers, chosen)
        self.session = self._open_session(options, chosen)
        self.providers = self.session.get_providers()
        inputs = {i.name for i in self.session.get_inputs()}
        if "input_ids" not in inputs:
            raise ValueError(f"{self.model_path}: no input_ids input (inputs: {sorted(inputs)})")
        unknown = inputs - {"input_ids", "attention_mask", "position_ids"}
        if unknown:
            raise ValueError(f"{self.model_path}: unsupported inputs {sorted(unknown)} (export "
                             "without past key values)")
        self._inputs = inputs
        outputs = {o.name: o for o in self.session.get_outputs()}
        if "nll" in outputs:
            self.output = "nll"
        elif "logits" in outputs:
            self.output = "logits"
        else:
            raise ValueError(f"{self.model_path}: needs an output named `nll` [batch, seq] or "
                             f"`logits` [batch, seq, vocab] (outputs: {sorted(outputs)})")
        self.max_tokens = max(self.context, int(max_tokens))
        if self.output == "logits":
            vocab = outputs["logits"].shape[-1]
            vocab = vocab if isinstance(vocab, int) else self.tokenizer.get_vocab_size()
            self.max_tokens = max(self.context, min(self.max_tokens, MAX_LOGITS_PER_RUN // vocab))
        self.runs = 0  # onnxruntime calls (tests, benchmarks)

    def _open_session(self, options, providers: Sequence[str]):
        """The onnxruntime session for ``self.model_path`` (a subclass may load the graph
        differently, e.g. bastion/reference_server/generation.py adds an output)."""
        import onnxruntime as ort
        return ort.InferenceSession(str(self.model_path), options, providers=list(providers))

    def __repr__(self) -> str:
        return (f"LMRunner({self.name!r}, output={self.output}, context={self.context}, "
                f"providers={self.providers})")

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def bucket(self, length: int) -> int:
        return self.buckets[bisect.bisect_left(self.buckets, length)]

    def token_nll(self, texts: Sequence[str]) -> list[TokenNLL]:
        """Per-token NLL of each text (all of it: long texts run as overlapping chunks)."""
        encoded = self.encode(texts)
        prefix = self.prefix_ids
        first = 0 if prefix else 1
        rows: list[list[int]] = []
        owners: list[tuple[int, int, int, int]] = []   # (text, chunk start, own_from, own_to)
        for index, ids in enumerate(encoded):
            sequence = prefix + ids
            for start, stop, own_from, own_to in chunk_plan(len(sequence), self.context,
                                                            self.overlap):
                rows.append(sequence[start:stop])
                owners.append((index, start, own_from, own_to))
        row_nll = self.run_rows(rows)
        out = [np.zeros(max(0, len(ids) - first), dtype=np.float64) for ids in encoded]
        offset = len(prefix)
        for (index, start, own_from, own_to), values in zip(owners, row_nll):
            lo = max(own_from, offset + first)  # sequence positions of scored text tokens
            if own_to > lo:
                out[index][lo - offset - first:own_to - offset - first] = \
                    values[lo - start:own_to - start]
        return [TokenNLL(nll, first, len(ids)) for nll, ids in zip(out, encoded)]

    def run_rows(self, rows: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """NLL per position of each row (position 0 = 0): rows grouped by bucket, padded right."""
        results: list[np.ndarray | None] = [None] * len(rows)
        groups: dict[int, list[int]] = collections.defaultdict(list)
        for index, row in enumerate(rows):
            if len(row) > self.context:
                raise ValueError(f"row of {len(row)} tokens exceeds the context {self.context}")
            groups[self.bucket(len(row))].append(index)
        for width, members in sorted(groups.items()):
            per_run = max(1, self.max_tokens // width)
            for begin in range(0, len(members), per_run):
                part = members[begin:begin + per_run]
                ids = np.full((len(part), width), self.pad_id, dtype=np.int64)
                mask = np.zeros((len(part), width), dtype=np.int64)
                for r, index in enumerate(part):
                    ids[r, :len(rows[index])] = rows[index]
                    mask[r, :len(rows[index])] = 1
                values = self._run(ids, mask)
                for r, index in enumerate(part):
                    results[index] = values[r, :len(rows[index])]
        return results  # type: ignore[return-value]

    def _run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": ids}
        if "attention_mask" in self._inputs:
            feeds["attention_mask"] = mask
        if "position_ids" in self._inputs:
            feeds["position_ids"] = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64),
                                                    ids.shape).copy()
        self.runs += 1
        out = self.session.run([self.output], feeds)[0]
        if self.output == "nll":
            return np.asarray(out, dtype=np.float64) * mask
        return nll_from_logits(out, ids) * mask


def nll_from_logits(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """[batch, seq, vocab] logits -> [batch, seq] NLL of ids[:, t] given ids[:, :t] (col 0 = 0)."""
    batch, seq = ids.shape
    out = np.zeros((batch, seq), dtype=np.float64)
    if seq < 2:
        return out
    for b in range(batch):  # one row at a time keeps the float temporaries small
        row = np.asarray(logits[b, :-1], dtype=np.float32)
        top = row.max(axis=-1)
        lse = np.log(np.exp(row - top[:, None]).sum(axis=-1, dtype=np.float64)) + top
        picked = row[np.arange(seq - 1), ids[b, 1:]]
        out[b, 1:] = lse - picked
    return out


_RUNNERS: dict[tuple, LMRunner] = {}
_RUNNERS_LOCK = threading.Lock()


def get_runner(model: str, providers: Sequence[str] | None = None, threads: int = 1,
               context: int | None = None, buckets: Sequence[int] | None = None) -> LMRunner:
    """One runner (one onnxruntime session) per model and settings, shared by every stage and
    kept across config reloads."""
    onnx_path, _, _ = resolve_model(model)
    key = (str(onnx_path.resolve()), onnx_path.stat().st_mtime_ns,
           tuple(providers) if providers else tuple(default_providers()), int(threads),
           context, tuple(buckets) if buckets else None)
    with _RUNNERS_LOCK:
        runner = _RUNNERS.get(key)
        if runner is None:
            runner = _RUNNERS[key] = LMRunner(model, providers, threads, context, buckets)
        return runner
