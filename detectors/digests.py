"""Digests that Bastion's own data files record, so that loading can refuse a file that was
changed, is corrupt or is half written: the sha256 of an array (its dtype, shape and bytes) and
the checksum of a JSON manifest or header (every key but ``checksum`` itself, canonically
serialised). The attack library (:mod:`bastion.detectors.known_attacks`) and the fitted anomaly
states use them.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import numpy as np

__all__ = ["array_digest", "manifest_checksum"]


def array_digest(array: np.ndarray) -> str:
    """sha256 (hex) of an array's dtype, shape and C-order bytes."""
    array = np.array(array, order="C", copy=None)  # (ascontiguousarray would make 0-d 1-d)
    digest = hashlib.sha256()
    digest.update(f"{array.dtype.str}{list(array.shape)}".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def manifest_checksum(manifest: Mapping) -> str:
    """sha256 (hex) of ``manifest`` without its ``checksum`` key, as sorted compact JSON."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
                          ).hexdigest()


def check_manifest(manifest: Mapping, where: object, fmt: str, version: int,
                   error: type[Exception], what: str, refit: str = "") -> None:
    """Raise ``error`` (naming ``where`` and ``what``) unless ``manifest`` has format ``fmt``,
    version ``version`` and a matching checksum; ``refit`` is appended to the version error
    (how to make a current one)."""
    if manifest.get("format") != fmt:
        raise error(f"{where}: not a bastion {what} (format {manifest.get('format')!r}, "
                    f"expected {fmt!r})")
    if manifest.get("version") != version:
        raise error(f"{where}: {what} version {manifest.get('version')!r}; this Bastion reads "
                    f"version {version}{refit}")
    if manifest.get("checksum") != manifest_checksum(manifest):
        raise error(f"{where}: {what} header checksum mismatch (the file was modified)")
