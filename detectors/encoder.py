"""Text embeddings inside the sidecar: the shared ONNX text :class:`Encoder`.

:class:`Encoder` runs a sentence encoder exported to ONNX (``bastion models export minilm``:
all-MiniLM-L6-v2 with mean pooling and L2 normalisation inside the graph) with the
``tokenizers`` library and onnxruntime. Concurrent requests' texts are gathered by one
:class:`~bastion.detectors.batcher.MicroBatcher` per encoder, so one ONNX call serves many
requests; encoders are shared by every stage that names the same model file and settings
(:func:`get_encoder`), and recent texts' embeddings are cached, so a pipeline with
``detect.embedding`` and ``detect.attack_library`` encodes each prompt once.

One pass per prompt: a graph may have several outputs (a ``bastion models export classifier``
folder has ``logits`` and ``embedding``). Every output is computed by the same run and cached
together, so ``detect.classifier``, ``detect.embedding`` and ``detect.attack_library`` on one
model folder share one ONNX run per prompt window. Early exit: a classifier graph with an
``exit_gate`` input (:mod:`bastion.export.early_exit`) lets clearly benign windows skip its last
layers when the encoder runs with ``early_exit`` (``detect.classifier``'s default); the
embedding stages run it without (their embeddings must be the last layer's), so a classifier
that should share their run sets ``early_exit: false``. The embedding the anomaly and library stages
use is the manifest's ``output``, else the output named ``embedding``, else the first one.

Long texts: the model sees at most ``max_length`` tokens (256 for MiniLM). A longer text is cut
into windows of ``max_length`` tokens (a quarter overlapping); the first ``max_chunks`` windows
are embedded, or, when there are more, ``max_chunks`` windows spread evenly from the first to
the last (the cost is bounded; the end of the text is always seen). Detectors score every
window and keep the worst. ``max_chunks: 1`` is plain truncation, as sentence-transformers does.

Options shared by the encoder stages: ``encoder`` (the exported folder, or a ``.onnx`` file
with ``tokenizer.json`` beside it; ``model_int8.onnx`` for the int8 model), ``variant``
(auto|fp32|int8: which file of a folder; default fp32 = ``model.onnx`` for a sentence encoder
folder and ``auto`` for a classifier folder, the same file ``detect.classifier`` picks, so the
stages share its run; see :mod:`bastion.detectors.cpu_features`), ``providers``
(default: ``BASTION_ONNX_PROVIDERS``, comma-separated, else CPU), ``threads`` (onnxruntime
intra-op threads), ``max_batch``, ``max_wait_ms`` (micro-batching), ``max_chunks``.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import threading
import types
from collections.abc import Mapping, Sequence

import numpy as np
from pydantic import Field

from bastion.core.registry import StageOptions
from bastion.detectors.base import as_text as _as_str
from bastion.detectors.batcher import MicroBatcher
from bastion.detectors.cpu_features import Variant, choose_variant

__all__ = ["Encoder", "EncoderOptions", "EncoderRuntimeOptions", "EncoderStageOptions",
           "get_encoder", "resolve_encoder_path", "model_file", "default_providers",
           "sha256_file", "Outputs", "MANIFESTS", "MODEL_FILES", "EXIT_INPUT", "NO_EXIT",
           "live_encoders"]

log = logging.getLogger("bastion.embedding")

PROVIDERS_ENV = "BASTION_ONNX_PROVIDERS"
#: A classifier graph's early-exit input (bastion/export/early_exit.py builds it) and the gate
#: that sends every window through the whole model.
EXIT_INPUT = "exit_gate"
NO_EXIT = -1.0
DEFAULT_MAX_CHUNKS = 8
#: Manifests a model folder may hold, in the order they are looked for.
MANIFESTS = ("encoder.json", "classifier.json")
#: The file of each variant in an exported folder.
MODEL_FILES = {"fp32": "model.onnx", "int8": "model_int8.onnx"}

#: One text's model outputs: output name -> [windows, ...] array (read-only).
Outputs = Mapping[str, np.ndarray]


def default_providers() -> list[str]:
    value = os.environ.get(PROVIDERS_ENV, "").strip()
    if value:
        return [p.strip() for p in value.split(",") if p.strip()]
    return ["CPUExecutionProvider"]


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file, cached by (path, mtime, size)."""
    stat = os.stat(path)
    key = (str(pathlib.Path(path).resolve()), stat.st_mtime_ns, stat.st_size)
    cached = _SHA_CACHE.get(key)
    if cached is None:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        cached = _SHA_CACHE[key] = digest.hexdigest()
    return cached


def model_file(folder: pathlib.Path, variant: Variant | None = None) -> pathlib.Path:
    """The model file of an exported folder for ``variant``; None = the folder's default
    (``auto`` for a classifier folder, fp32 otherwise)."""
    if variant is None:
        variant = "auto" if (folder / "classifier.json").exists() else "fp32"
    chosen = choose_variant(variant, (folder / MODEL_FILES["int8"]).exists())
    path = folder / MODEL_FILES[chosen]
    if chosen == "int8" and not path.exists() and (folder / MODEL_FILES["fp32"]).exists():
        raise FileNotFoundError(f"{folder} has no {path.name} (variant int8; re-run the export "
                                "without --no-int8, or use variant fp32)")
    return path


def resolve_encoder_path(path: str | os.PathLike, variant: Variant | None = None
                         ) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path | None]:
    """(model file, tokenizer.json, manifest or None) for a folder (its ``variant`` file, see
    :func:`model_file`) or a model file; the manifest is encoder.json or classifier.json."""
    path = pathlib.Path(path)
    model = model_file(path, variant) if path.is_dir() else path
    folder = model.parent
    if not model.exists():
        raise FileNotFoundError(f"encoder model {model} does not exist (export it with "
                                "`bastion models export minilm --out DIR`, or `bastion models "
                                "export classifier --from CHECKPOINT --out DIR`)")
    tokenizer = folder / "tokenizer.json"
    if not tokenizer.exists():
        raise FileNotFoundError(f"no tokenizer.json next to {model}")
    manifest = next((folder / m for m in MANIFESTS if (folder / m).exists()), None)
    return model, tokenizer, manifest


@dataclasses.dataclass(frozen=True)
class EncoderOptions:
    providers: tuple[str, ...] | None = None
    threads: int = 1
    max_batch: int = 16
    max_wait_ms: float = 2.0
    max_chunks: int = DEFAULT_MAX_CHUNKS
    cache_size: int = 2048
    #: Feed a graph with an early exit (``exit_gate`` input) its manifest's gate; off, every
    #: window runs the whole model (what stages reading embeddings need).
    early_exit: bool = False


class Encoder:
    """Tokenizer + ONNX text model, batched across concurrent callers.

    ``embed(texts)`` (blocking) and ``await aembed(text)`` return, per text, a float32 array
    [windows, dim] of L2-normalised window embeddings (one row for a text that fits).
    ``encode(texts)`` returns [n, dim], each text's first window (plain truncation).
    ``outputs_of(texts)`` / ``await aoutputs(text)`` return every output of the graph per text
    ({name: [windows, ...]}), from the same run and cache as the embeddings.
    """

    def __init__(self, path: str | os.PathLike, options: EncoderOptions = EncoderOptions()):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.model_path, tokenizer_path, manifest_path = resolve_encoder_path(path)
        #: What this encoder read (a stage's loaded_files).
        self.files = tuple(p for p in (self.model_path, tokenizer_path, manifest_path) if p)
        self.options = options
        self.manifest: dict = (json.loads(manifest_path.read_text()) if manifest_path else {})
        self.sha256 = sha256_file(self.model_path)
        entry = self.manifest.get("models", {}).get(self.model_path.name, {})
        if entry.get("sha256") and entry["sha256"] != self.sha256:
            raise ValueError(f"{self.model_path}: sha256 differs from {manifest_path} (the "
                             "model file was replaced; re-run the export)")
        self.name = self.manifest.get("name") or self.model_path.parent.name
        self.variant = entry.get("variant") or ("int8" if "int8" in self.model_path.name
                                                else "fp32")
        #: Exact feature source: states fitted with another model file are refused.
        self.identity = f"encoder:{self.name}:{self.variant}:sha256={self.sha256}"
        weights = self.manifest.get("source", {}).get("weights_sha256") or self.sha256
        #: The weights the embeddings come from, whatever the export (fp32 / int8 / re-export):
        #: what an attack library built with this encoder must match.
        self.weights_identity = f"{self.name}:weights={weights}"

        if options.max_chunks < 1:
            raise ValueError("max_chunks must be >= 1")
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.max_length = int(self.manifest.get("max_length", 256))
        self.pad_id = int(self.manifest.get("pad_id", 0))
        self.prefix, self.suffix = self._special_ids()
        self.window = self.max_length - len(self.prefix) - len(self.suffix)
        if self.window < 8:
            raise ValueError(f"max_length {self.max_length} leaves no room for text")
        self.stride = max(1, self.window - self.window // 4)

        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = max(1, options.threads)
        session_options.inter_op_num_threads = 1
        wanted = list(options.providers) if options.providers else default_providers()
        available = set(ort.get_available_providers())
        providers = [p for p in wanted if p in available] or ["CPUExecutionProvider"]
        if providers != wanted:
            log.warning("onnx providers %s not available; using %s", wanted, providers)
        self.session = ort.InferenceSession(str(self.model_path), session_options,
                                            providers=providers)
        names = {i.name for i in self.session.get_inputs()}
        self._token_types = "token_type_ids" in names
        #: The early exit's gate fed to the graph (None: the graph has no exit; -1: off).
        self.exit_gate: float | None = None
        if EXIT_INPUT in names:
            exit_entry = self.manifest.get("early_exit") or {}
            self.exit_gate = (float(exit_entry["gate"]) if options.early_exit
                              and exit_entry.get("gate") is not None else NO_EXIT)
        graph_outputs = {o.name: o for o in self.session.get_outputs()}
        #: Every output is computed by each run (one pass serves every stage on this model).
        self.outputs: tuple[str, ...] = tuple(graph_outputs)
        self.output = self.manifest.get("output") or (
            "embedding" if "embedding" in graph_outputs else self.outputs[0])
        if self.output not in graph_outputs:
            raise ValueError(f"{self.model_path}: no output {self.output!r} (the graph has "
                             f"{', '.join(self.outputs)})")
        width = graph_outputs[self.output].shape[-1]
        self.dim = int(width) if isinstance(width, int) else int(self.manifest.get("dim", 0))
        self.batcher: MicroBatcher[str, Outputs] = MicroBatcher(
            self._encode_batch, max_batch=options.max_batch, max_wait_ms=options.max_wait_ms,
            threads=1, name=f"encoder-{self.name}")
        self._cache: collections.OrderedDict[bytes, Outputs] = collections.OrderedDict()
        self._cache_lock = threading.Lock()
        # Texts being run now, per event loop: a second caller waits for the same run.
        self._inflight: dict[bytes, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self.calls = 0  # ONNX runs (for tests and benchmarks)
        #: Windows run, and those that left at the early exit (bastion_encoder_windows_total).
        self.windows_run = 0
        self.windows_exited = 0
        self._counts_lock = threading.Lock()

    def _special_ids(self) -> tuple[list[int], list[int]]:
        cls, sep = self.manifest.get("cls_token"), self.manifest.get("sep_token")
        if cls and sep:
            ids = [self.tokenizer.token_to_id(cls), self.tokenizer.token_to_id(sep)]
            if None in ids:
                raise ValueError(f"tokenizer has no {cls} / {sep} token")
            return [ids[0]], [ids[1]]
        # No manifest: what the tokenizer's post-processor wraps an empty text in.
        empty = self.tokenizer.encode("", add_special_tokens=True).ids
        return (empty[:1], empty[1:2]) if len(empty) == 2 else (list(empty), [])

    # -- tokenization --------------------------------------------------------------------------

    def windows(self, ids: Sequence[int]) -> list[list[int]]:
        """Token ids (without special tokens) -> model inputs of at most max_length tokens."""
        ids = list(ids)
        if len(ids) <= self.window:
            starts = [0]
        else:
            last = len(ids) - self.window
            count = -(-last // self.stride) + 1  # windows needed to cover everything
            if count <= self.options.max_chunks:
                starts = [min(i * self.stride, last) for i in range(count)]
            elif self.options.max_chunks == 1:
                starts = [0]
            else:
                starts = [round(i * last / (self.options.max_chunks - 1))
                          for i in range(self.options.max_chunks)]
        return [self.prefix + ids[s:s + self.window] + self.suffix for s in starts]

    def tokenize(self, texts: Sequence[str]) -> list[list[list[int]]]:
        encodings = self.tokenizer.encode_batch([_as_str(t) for t in texts],
                                                add_special_tokens=False)
        return [self.windows(e.ids) for e in encodings]

    # -- model ---------------------------------------------------------------------------------

    def _groups(self, units: list[list[int]]) -> list[list[int]]:
        """Indices of ``units`` in sub-batches: sorted by length, at most max_batch each, and a
        new sub-batch whenever a unit is over twice as long as the sub-batch's shortest (a
        short prompt is never padded to a long one's length)."""
        order = sorted(range(len(units)), key=lambda i: len(units[i]))
        step = max(1, self.options.max_batch)
        groups: list[list[int]] = []
        for i in order:
            if (not groups or len(groups[-1]) >= step
                    or len(units[i]) > 2 * len(units[groups[-1][0]]) + 8):
                groups.append([])
            groups[-1].append(i)
        return groups

    def _run(self, units: list[list[int]]) -> dict[str, np.ndarray]:
        """Run token-id lists, in length-bucketed sub-batches (see :meth:`_groups`): every
        graph output, [len(units), ...] each."""
        out: dict[str, np.ndarray] = {}
        for chosen in self._groups(units):
            width = max(len(units[i]) for i in chosen)
            ids = np.full((len(chosen), width), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(chosen), width), dtype=np.int64)
            for row, i in enumerate(chosen):
                ids[row, :len(units[i])] = units[i]
                mask[row, :len(units[i])] = 1
            feeds = {"input_ids": ids, "attention_mask": mask}
            if self._token_types:
                feeds["token_type_ids"] = np.zeros_like(ids)
            if self.exit_gate is not None:
                feeds[EXIT_INPUT] = np.array(self.exit_gate, dtype=np.float32)
            results = self.session.run(list(self.outputs), feeds)
            self.calls += 1
            exited = self._exited(dict(zip(self.outputs, results)))
            with self._counts_lock:
                self.windows_run += len(chosen)
                self.windows_exited += exited
            for name, result in zip(self.outputs, results):
                if name not in out:
                    out[name] = np.empty((len(units),) + result.shape[1:], dtype=result.dtype)
                out[name][chosen] = result
        if self.output in out:
            self.dim = int(out[self.output].shape[1])
        return out

    def _exited(self, results: dict[str, np.ndarray]) -> int:
        """Rows of one run that left at the early exit. The exit graph writes exactly
        ``[0, z - log k, ..., z - log k]`` for them (bastion/export/early_exit.py): a benign
        logit of exactly 0 with equal attack logits, which the full head does not produce."""
        logits = results.get("logits")
        if self.exit_gate is None or self.exit_gate <= 0 or logits is None or logits.ndim != 2:
            return 0
        attack = logits[:, 1:]
        return int(np.sum((logits[:, 0] == 0.0) & np.all(attack == attack[:, :1], axis=1)))

    def _encode_batch(self, texts: Sequence[str]) -> list[Outputs]:
        per_text = self.tokenize(texts)
        units = [unit for windows in per_text for unit in windows]
        flat = self._run(units)
        results, position = [], 0
        for windows in per_text:
            stop = position + len(windows)
            results.append(types.MappingProxyType(
                {name: array[position:stop] for name, array in flat.items()}))
            position = stop
        return results

    # -- cache ---------------------------------------------------------------------------------

    @staticmethod
    def _key(text: str) -> bytes:
        return hashlib.blake2b(_as_str(text).encode("utf-8", "surrogatepass"),
                               digest_size=16).digest()

    def cached_outputs(self, text: str) -> Outputs | None:
        if not self.options.cache_size:
            return None
        key = self._key(text)
        with self._cache_lock:
            value = self._cache.get(key)
            if value is not None:
                self._cache.move_to_end(key)
            return value

    def cached(self, text: str) -> np.ndarray | None:
        """The cached window embeddings of ``text``, or None."""
        value = self.cached_outputs(text)
        return None if value is None else value[self.output]

    def _remember(self, text: str, value: Outputs) -> None:
        for array in value.values():
            array.setflags(write=False)
        if not self.options.cache_size:
            return
        with self._cache_lock:
            self._cache[self._key(text)] = value
            while len(self._cache) > self.options.cache_size:
                self._cache.popitem(last=False)

    # -- public --------------------------------------------------------------------------------

    def outputs_of(self, texts: Sequence[str], chunk: int = 64) -> list[Outputs]:
        """Blocking: per text, every graph output over its windows ({name: [windows, ...]})."""
        out: list[Outputs | None] = [self.cached_outputs(t) for t in texts]
        missing = [i for i, v in enumerate(out) if v is None]
        for start in range(0, len(missing), chunk):
            indices = missing[start:start + chunk]
            for i, value in zip(indices, self._encode_batch([texts[i] for i in indices])):
                self._remember(texts[i], value)
                out[i] = value
        return out  # type: ignore[return-value]

    def embed(self, texts: Sequence[str], chunk: int = 64) -> list[np.ndarray]:
        """Blocking: per text, its window embeddings [windows, dim]."""
        return [value[self.output] for value in self.outputs_of(texts, chunk)]

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Blocking: [n, dim], each text's first window (truncation)."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([windows[0] for windows in self.embed(texts)])

    async def aoutputs(self, text: str) -> Outputs:
        value = self.cached_outputs(text)
        if value is not None:
            return value
        key, loop = self._key(text), asyncio.get_running_loop()
        running = self._inflight.get(key)
        if running is None or running[0] is not loop or running[1].done():
            future = loop.create_task(self._submit(key, text))
            self._inflight[key] = running = (loop, future)
        # shield: one caller's timeout must not cancel the run the others wait for
        return await asyncio.shield(running[1])

    async def _submit(self, key: bytes, text: str) -> Outputs:
        try:
            value = await self.batcher.submit(text)
            self._remember(text, value)
            return value
        finally:
            self._inflight.pop(key, None)

    async def aoutputs_many(self, texts: Sequence[str]) -> list[Outputs]:
        if len(texts) == 1:
            return [await self.aoutputs(texts[0])]
        return list(await asyncio.gather(*(self.aoutputs(t) for t in texts)))

    async def aembed(self, text: str) -> np.ndarray:
        return (await self.aoutputs(text))[self.output]

    async def aembed_many(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [value[self.output] for value in await self.aoutputs_many(texts)]

    def close(self) -> None:
        self.batcher.close()


_ENCODERS: dict[tuple, Encoder] = {}
_ENCODERS_LOCK = threading.Lock()


def live_encoders() -> list[Encoder]:
    """Every shared encoder built in this process (for the metrics collector)."""
    with _ENCODERS_LOCK:
        return list(_ENCODERS.values())


def get_encoder(path: str | os.PathLike, options: EncoderOptions = EncoderOptions(),
                variant: Variant | None = None) -> Encoder:
    """One shared :class:`Encoder` per model file (and its version on disk) and settings."""
    model, _, _ = resolve_encoder_path(path, variant)
    stat = model.stat()
    key = (str(model.resolve()), stat.st_mtime_ns, stat.st_size, options)
    with _ENCODERS_LOCK:
        encoder = _ENCODERS.get(key)
        if encoder is None:
            encoder = _ENCODERS[key] = Encoder(model, options)
        return encoder


class EncoderRuntimeOptions(StageOptions):
    """How a stage's model runs: onnxruntime providers and threads, micro-batching, windows.
    Stages on one model file with equal settings share one :class:`Encoder`."""
    providers: list[str] | None = None
    threads: int = Field(default=1, ge=1, le=64)
    max_batch: int = Field(default=16, ge=1, le=1024)
    max_wait_ms: float = Field(default=2.0, ge=0, le=1000)
    max_chunks: int = Field(default=DEFAULT_MAX_CHUNKS, ge=1, le=64)

    def encoder_options(self) -> EncoderOptions:
        return EncoderOptions(providers=tuple(self.providers) if self.providers else None,
                              threads=self.threads, max_batch=self.max_batch,
                              max_wait_ms=self.max_wait_ms, max_chunks=self.max_chunks)


class EncoderStageOptions(EncoderRuntimeOptions):
    #: Exported encoder folder (``bastion models export minilm --out DIR``, or a classifier
    #: folder: its ``embedding`` output) or a .onnx file.
    encoder: str = "models/minilm"
    #: Which file of a folder (see :func:`model_file`); None = the folder's default.
    variant: Variant | None = None

    def get_encoder(self) -> "Encoder":
        return get_encoder(self.encoder, self.encoder_options(), self.variant)
