"""Labelled corpora as inference requests: one loader for `bastion replay` and `bastion demo`.

A corpus is JSON Lines (``.jsonl``, or gzip-compressed ``.jsonl.gz``), one record a line::

    {"text": "What is a black hole?", "label": "benign", "family": "benign_chat"}
    {"tensor": "images.npz#adv[3]", "label": "attack", "family": "fgsm", "id": "adv-3"}

* ``label`` is ``benign`` or ``attack``; ``family`` names the kind of traffic (default: the
  label); ``id`` is optional (default ``<file stem>-<line>``); ``model`` optionally overrides the
  model the record is sent to.
* ``text`` records become the model's BYTES input (default name ``prompt``), shape [1, 1].
* ``tensor`` records become an FP32 input: ``"x.npy"`` (the whole array), ``"x.npz#key"`` (one
  array of an archive) or ``"x.npz#key[i]"`` (item ``i`` of it, sent with a leading batch
  dimension of 1). Paths are relative to the corpus file. ``shape`` (per record, or the
  ``shape`` argument) reshapes the array; values are cast to float32 as they are (uint8 images
  are not rescaled). ``class`` (optional, an integer) is a tensor record's true class: the
  black-box image mutator (``bastion replay --mutate square``) attacks it, else the model's
  answer to the clean image.

Every record is encoded once into the serialized ``ModelInferRequest`` a client would send
(:class:`CorpusRecord` is a :class:`bastion.traffic.Record`, so it also fits the demo's traffic
loop). Errors are :class:`CorpusError` naming the file and line. Texts are never printed.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import pathlib
import random
import re
from collections.abc import Sequence

import numpy as np

from bastion import traffic
from bastion.protos import codec, pb

LABELS = ("benign", "attack")
DEFAULT_TEXT_INPUT = "prompt"
_TENSOR_REF = re.compile(r"^(?P<path>[^#]+?)(?:#(?P<key>[^\[\]]+)(?:\[(?P<index>-?\d+)\])?)?$")


class CorpusError(ValueError):
    """A corpus file or record is unusable; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class CorpusRecord(traffic.Record):
    """A labelled request: ``model``, ``label``, ``family``, ``payload`` (request bytes), plus
    the record's ``id`` and ``kind`` (text | tensor)."""
    id: str = ""
    kind: str = "text"


def _open_text(path: pathlib.Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def read_rows(path: str | pathlib.Path) -> list[dict]:
    """The records of a ``.jsonl`` / ``.jsonl.gz`` file, checked; each gets ``_line``."""
    path = pathlib.Path(path)
    rows = []
    try:
        with _open_text(path) as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise CorpusError(f"{where}: not JSON ({err.msg})") from None
                _check_row(row, where)
                row["_line"] = number
                rows.append(row)
    except OSError as err:
        raise CorpusError(f"{path}: cannot read: {err.strerror or err}") from None
    except (UnicodeDecodeError, EOFError, gzip.BadGzipFile) as err:
        raise CorpusError(f"{path}: cannot read: {err}") from None
    if not rows:
        raise CorpusError(f"{path}: no records")
    return rows


def _check_row(row, where: str) -> None:
    if not isinstance(row, dict):
        raise CorpusError(f"{where}: a record must be a JSON object")
    if row.get("label") not in LABELS:
        raise CorpusError(f"{where}: label must be one of {', '.join(LABELS)}, got "
                          f"{str(row.get('label'))[:40]!r}")
    has_text, has_tensor = "text" in row, "tensor" in row
    if has_text == has_tensor:
        raise CorpusError(f"{where}: a record needs exactly one of 'text' or 'tensor'")
    if has_text and not isinstance(row["text"], str):
        raise CorpusError(f"{where}: 'text' must be a string")
    if has_tensor and not isinstance(row["tensor"], str):
        raise CorpusError(f"{where}: 'tensor' must be a string such as 'x.npy' or 'x.npz#key[0]'")
    if "class" in row and (isinstance(row["class"], bool) or not isinstance(row["class"], int)
                           or row["class"] < 0):
        raise CorpusError(f"{where}: 'class' must be a class index (an integer >= 0)")
    for key in ("family", "id", "model", "input"):
        if key in row and not isinstance(row[key], str):
            raise CorpusError(f"{where}: '{key}' must be a string")


class TensorLoader:
    """Resolves ``x.npy`` / ``x.npz#key[index]`` relative to the corpus, caching each file."""

    def __init__(self, base_dir: pathlib.Path):
        self.base_dir = base_dir
        self._files: dict[pathlib.Path, object] = {}

    def _file(self, path: pathlib.Path, where: str):
        if path not in self._files:
            try:
                loaded = np.load(path, allow_pickle=False)
            except OSError as err:
                raise CorpusError(f"{where}: {path}: cannot load: {err.strerror or err}") from None
            except ValueError as err:
                raise CorpusError(f"{where}: {path}: cannot load: {err}") from None
            if isinstance(loaded, np.lib.npyio.NpzFile):
                loaded = {key: loaded[key] for key in loaded.files}
            self._files[path] = loaded
        return self._files[path]

    def load(self, ref: str, where: str) -> np.ndarray:
        match = _TENSOR_REF.match(ref.strip())
        if match is None:
            raise CorpusError(f"{where}: bad tensor reference {ref[:80]!r} (expected 'x.npy', "
                              "'x.npz#key' or 'x.npz#key[index]')")
        path = pathlib.Path(match["path"])
        path = path if path.is_absolute() else self.base_dir / path
        data = self._file(path, where)
        key, index = match["key"], match["index"]
        if isinstance(data, dict):
            if key is None:
                if len(data) != 1:
                    raise CorpusError(f"{where}: {path.name} holds {', '.join(sorted(data))}; "
                                      "name one with '#key'")
                key = next(iter(data))
            if key not in data:
                raise CorpusError(f"{where}: {path.name} has no array {key!r} "
                                  f"(has {', '.join(sorted(data))})")
            array = data[key]
        else:
            if key is not None:
                raise CorpusError(f"{where}: {path.name} is a single .npy array; drop '#{key}'")
            array = data
        if index is not None:
            try:
                array = array[int(index)][None, ...]
            except IndexError:
                raise CorpusError(f"{where}: index {index} out of range for {key!r} "
                                  f"({array.shape[0]} items)") from None
        if array.dtype.kind not in "biuf":
            raise CorpusError(f"{where}: tensor has dtype {array.dtype}, expected numbers")
        return np.ascontiguousarray(array, dtype=np.float32)


def text_payload(model: str, text: str, input_name: str = DEFAULT_TEXT_INPUT,
                 request_id: str = "") -> bytes:
    """The serialized ModelInferRequest for one prompt: BYTES ``input_name``, shape [1, 1]."""
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    codec.encode_request(request, {input_name: codec.as_bytes_array([text], (1, 1))})
    return request.SerializeToString()


def tensor_payload(model: str, array: np.ndarray, input_name: str, request_id: str = "") -> bytes:
    """The serialized ModelInferRequest for one FP32 tensor input."""
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    codec.encode_request(request, {input_name: np.asarray(array, dtype=np.float32)},
                          {input_name: "FP32"})
    return request.SerializeToString()


def needs_tensor_input(rows: Sequence[dict]) -> bool:
    return any("tensor" in row and "input" not in row for row in rows)


def row_tensor(loader: TensorLoader, row: dict, where: str,
               shape: Sequence[int] | None = None) -> np.ndarray:
    """A tensor record's array as it is sent: loaded, then reshaped to the record's ``shape``
    or else ``shape`` (--shape)."""
    array = loader.load(row["tensor"], where)
    wanted = row.get("shape", shape)
    if wanted is not None:
        try:
            array = array.reshape([int(d) for d in wanted])
        except (ValueError, TypeError) as err:
            raise CorpusError(f"{where}: cannot reshape {list(array.shape)} to "
                              f"{wanted}: {err}") from None
    return array


def encode_rows(rows: Sequence[dict], path: str | pathlib.Path, model: str, *,
                text_input: str = DEFAULT_TEXT_INPUT, tensor_input: str | None = None,
                shape: Sequence[int] | None = None) -> list[CorpusRecord]:
    """Turn checked rows (from :func:`read_rows`) into records carrying request bytes."""
    path = pathlib.Path(path)
    stem = path.name.split(".")[0]
    loader = TensorLoader(path.parent)
    records = []
    for row in rows:
        where = f"{path}:{row.get('_line', '?')}"
        record_id = row.get("id") or f"{stem}-{row.get('_line', len(records) + 1)}"
        target = row.get("model") or model
        family = row.get("family") or row["label"]
        if "text" in row:
            payload = text_payload(target, row["text"], row.get("input") or text_input, record_id)
            kind = "text"
        else:
            name = row.get("input") or tensor_input
            if not name:
                raise CorpusError(f"{where}: tensor record but no input name (pass --input)")
            array = row_tensor(loader, row, where, shape)
            payload = tensor_payload(target, array, name, record_id)
            kind = "tensor"
        records.append(CorpusRecord(target, row["label"], family, payload, record_id, kind))
    return records


def select(rows: list[dict], limit: int | None, seed: int = 0) -> list[dict]:
    """At most ``limit`` rows, drawn at random with ``seed`` (file order kept)."""
    if limit is None or limit >= len(rows):
        return rows
    chosen = sorted(random.Random(seed).sample(range(len(rows)), max(limit, 0)))
    return [rows[i] for i in chosen]


def load_records(path: str | pathlib.Path, model: str, *, text_input: str = DEFAULT_TEXT_INPUT,
                 tensor_input: str | None = None, shape: Sequence[int] | None = None,
                 limit: int | None = None, seed: int = 0) -> list[CorpusRecord]:
    """Read a corpus and encode every record (or a seeded sample of ``limit``) as requests."""
    rows = select(read_rows(path), limit, seed)
    return encode_rows(rows, path, model, text_input=text_input, tensor_input=tensor_input,
                       shape=shape)


def default_text_corpus() -> pathlib.Path:
    """The bundled labelled prompt sample (111 prompts; see bastion/data/README.md)."""
    return traffic._package_file("data", "text_sample.jsonl")


def demo_records(text_path: str | pathlib.Path | None = None) -> list[traffic.Record]:
    """The demo's traffic: the bundled images and their adversarial copies, a labelled text corpus (default: the
    bundled sample) loaded by :func:`load_records` for the text model, and one malformed
    request per protocol error. The text requests are byte-identical to what
    :func:`bastion.traffic.labelled_records` builds, so the demo and `bastion replay` of the
    same file send the same requests."""
    records = traffic.image_records()
    records.extend(load_records(text_path or default_text_corpus(), traffic.TEXT_MODEL))
    for name, payload in traffic.malformed_requests().items():
        model = traffic.TEXT_MODEL if name == "truncated_bytes" else traffic.IMAGE_MODEL
        records.append(traffic.Record(model, "malformed", f"malformed:{name}", payload))
    return records
