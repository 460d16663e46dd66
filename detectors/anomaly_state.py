"""Checksummed detector state files (``.npz``, no pickle): the one writer and reader of every
detector state format (the anomaly states of :mod:`bastion.detectors.anomaly`, the feature
ensemble's of :mod:`bastion.detectors.feature_ensemble`).

A state is its arrays plus ``__header__``, a JSON document with the format name and version, the
caller's fields, the sha256 of every array and a checksum over the header and the array digests.
Reading refuses (:class:`StateError`, naming the file and what is wrong) a file of another
format or version, or with a changed array or header.
"""
from __future__ import annotations

import io
import json
import os
import pathlib

import numpy as np

from bastion.detectors.digests import array_digest, check_manifest, manifest_checksum

__all__ = ["StateError", "write_state_file", "read_state_file", "read_header"]

_HEADER_KEY = "__header__"


class StateError(ValueError):
    """A state file that must not be used (other source, version, method; bad checksum)."""


def write_state_file(path: str | os.PathLike, header: dict,
                     arrays: dict[str, np.ndarray]) -> pathlib.Path:
    """Write a checksummed state (``header`` + the digest of every array) atomically: a
    temporary file renamed over ``path``. The one writer of every detector state format."""
    path = pathlib.Path(path)
    header = {**header, "arrays": {name: array_digest(a) for name, a in sorted(arrays.items())}}
    header["checksum"] = manifest_checksum(header)
    payload = dict(arrays)
    payload[_HEADER_KEY] = np.frombuffer(json.dumps(header, sort_keys=True).encode(), np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **payload)
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)
    return path


def read_state_file(path: str | os.PathLike, fmt: str, version: int,
                    what: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(header, arrays) of a state written by :func:`write_state_file`, verified: format,
    version, header checksum, and every array against its digest. ``what`` names the kind of
    state in errors."""
    path = pathlib.Path(path)
    try:
        data = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as err:
        raise StateError(f"{path}: not a readable state file ({err})") from None
    with data:
        if _HEADER_KEY not in data.files:
            raise StateError(f"{path}: not a bastion {what} state (no header)")
        try:
            header = json.loads(data[_HEADER_KEY].tobytes().decode())
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise StateError(f"{path}: unreadable header") from None
        check_manifest(header, path, fmt, version, StateError, f"{what} state",
                       refit=": refit it (bastion calibrate)")
        expected = header.get("arrays", {})
        present = {name for name in data.files if name != _HEADER_KEY}
        if present != set(expected):
            raise StateError(f"{path}: arrays {sorted(present)} do not match the header's "
                             f"{sorted(expected)}")
        arrays = {}
        for name in sorted(expected):
            array = data[name]
            if array_digest(array) != expected[name]:
                raise StateError(f"{path}: checksum mismatch in array {name!r} (the file was "
                                 "modified or is corrupt)")
            arrays[name] = array
    return header, arrays


def read_header(path: str | os.PathLike) -> dict:
    with np.load(path, allow_pickle=False) as data:
        if _HEADER_KEY not in data.files:
            raise StateError(f"{path}: not a bastion anomaly state (no header)")
        return json.loads(data[_HEADER_KEY].tobytes().decode())
