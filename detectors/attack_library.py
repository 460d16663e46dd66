"""The ``detect.attack_library`` stage: a prompt scored against a known-attack library.

``detect.attack_library`` {encoder, library, reload_interval_s, mode, contrast} embeds the
prompt with the shared :class:`~bastion.detectors.encoder.Encoder` and scores each of its
windows against the library (:mod:`bastion.detectors.known_attacks`: the modes ``nearest``,
``contrast`` (the default) and ``linear``, the file format, the encoder check); the worst
(largest) window counts.

``contrast`` (bool, the older option) still works when ``mode`` is not set: true = ``contrast``,
false = ``nearest``; ``mode`` wins when both are set. Benign entries come from
``bastion signatures add --label benign``. ``reasons`` are ``library:<family>`` of the best
window's nearest attack entry (in every mode, when the score is > 0). Set the threshold with
``bastion calibrate``; the scales differ per mode, so recalibrate when changing it.

The detector checks the files' mtime and size at most every ``reload_interval_s`` seconds and
reloads when they changed, without a restart; a half-written update (the .json not matching
the .npz) or a bad file is logged and the previous library kept until the next good one. On the
serving path the check and the reload run in a worker thread, so no request waits for them:
requests use the previous library until the new one is in place. ``library`` None is the
bundled starter library.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import Field

from bastion.core.registry import register
from bastion.detectors.base import TextDetector
from bastion.detectors.encoder import Encoder, EncoderStageOptions, _as_str
from bastion.detectors.known_attacks import (AttackLibrary, LibraryError, default_library_path,
                                             library_paths, resolve_mode)

__all__ = ["AttackLibraryDetector", "AttackLibraryOptions", "build_attack_library"]

log = logging.getLogger("bastion.attack_library")


def _clock() -> float:
    """Monotonic seconds (a function of its own, so tests can move time for this module only)."""
    return time.monotonic()


class AttackLibraryOptions(EncoderStageOptions):
    #: Library (NAME.npz with NAME.json beside it); None = the bundled starter library.
    library: str | None = None
    #: How often (at most) the files' mtime is checked for a reload; 0 = on every request.
    reload_interval_s: float = Field(default=5.0, ge=0)
    min_probe_cosine: float = Field(default=0.95, gt=0, le=1)
    #: nearest | contrast | linear (see :mod:`bastion.detectors.known_attacks`); None = from
    #: ``contrast``.
    mode: Literal["nearest", "contrast", "linear"] | None = None
    #: Older switch, used when ``mode`` is None: true = contrast, false = nearest.
    contrast: bool = True


class AttackLibraryDetector(TextDetector):
    """Scores prompts against a known-attack library; reloads it when its files change."""

    is_async = True

    def __init__(self, encoder: Encoder, library_path: str | os.PathLike,
                 reload_interval_s: float = 5.0, min_probe_cosine: float = 0.95,
                 contrast: bool = True, mode: str | None = None):
        self.encoder = encoder
        self.mode = resolve_mode(mode, contrast)
        self.path = library_paths(library_path)[0]
        self.reload_interval_s = reload_interval_s
        self.min_probe_cosine = min_probe_cosine
        self._lock = threading.Lock()  # _recent
        self._reload_lock = threading.Lock()
        self._recent: collections.OrderedDict[bytes, tuple[float, str]] = \
            collections.OrderedDict()
        self.reloads = 0
        self.reload_errors = 0
        self._failed_stamp = None
        self._reloading: asyncio.Future | None = None
        self._stamp = self._file_stamp()
        self.library = self._load()  # errors here are configuration errors
        self._checked_at = _clock()

    def _file_stamp(self):
        stamps = []
        for path in library_paths(self.path):
            try:
                stat = path.stat()
            except FileNotFoundError:
                stamps.append(None)
            else:
                stamps.append((stat.st_mtime_ns, stat.st_size, stat.st_ino))
        return tuple(stamps)

    def _load(self) -> AttackLibrary:
        library = AttackLibrary.load(self.path)
        library.check_encoder(self.encoder, self.min_probe_cosine)
        if self.mode == "linear":
            library.linear()  # fit now: a library it cannot fit is refused like a bad file
        return library

    def maybe_reload(self, force: bool = False) -> bool:
        """Reload the library if its files changed (checked at most every reload_interval_s)."""
        now = _clock()
        if not force and now - self._checked_at < self.reload_interval_s:
            return False
        # Its own lock: the request path takes ``_lock`` (recent scores) and must never wait
        # for a load that holds it.
        with self._reload_lock:
            self._checked_at = now
            stamp = self._file_stamp()
            if stamp == self._stamp or stamp == self._failed_stamp:
                return False
            try:
                library = self._load()
            except (LibraryError, OSError) as err:
                self.reload_errors += 1
                self._failed_stamp = stamp
                log.warning("attack library %s not reloaded, keeping the previous one (%d "
                            "entries): %s", self.path, len(self.library), err)
                return False
            self.library = library
            self._stamp = stamp
            self._failed_stamp = None
            self.reloads += 1
            with self._lock:
                self._recent.clear()
            log.info("attack library %s reloaded: %d entries", self.path, len(library))
            return True

    def _reload_in_background(self) -> None:
        """On the serving path, check for (and do) a reload in a worker thread: loading, the
        encoder probe and the ``linear`` fit take up to about a second, which must not stall the
        event loop. Requests go on with the current library until the new one is swapped in
        (one attribute assignment), so a change is seen by the requests after the reload."""
        if self._reloading is not None and not self._reloading.done():
            return
        if _clock() - self._checked_at < self.reload_interval_s:
            return
        self._reloading = asyncio.get_running_loop().run_in_executor(None, self._reload_logged)

    def _reload_logged(self) -> bool:
        try:
            return self.maybe_reload()
        except Exception:  # a worker thread's error would otherwise go unseen
            self.reload_errors += 1
            log.exception("attack library %s: reload failed, keeping the previous one",
                          self.path)
            return False

    def _match(self, texts: Sequence[str], windows: list[np.ndarray]) -> np.ndarray:
        library = self.library
        out = np.zeros(len(windows))
        for index, (text, rows) in enumerate(zip(texts, windows)):
            score, nearest = library.scores(rows, self.mode)
            out[index] = score
            family = library.entries[nearest]["family"] if nearest >= 0 else ""
            self._note(text, score, family)
        return out

    def _note(self, text: str, score: float, family: str) -> None:
        with self._lock:
            self._recent[Encoder._key(text)] = (score, family)
            while len(self._recent) > 1024:
                self._recent.popitem(last=False)

    def score(self, batch: Sequence[Any]) -> np.ndarray:
        self.maybe_reload()
        texts = [_as_str(t) for t in batch]
        if not texts:
            return np.zeros(0)
        return self._match(texts, self.encoder.embed(texts))

    async def ascore(self, batch: Sequence[Any]) -> np.ndarray:
        self._reload_in_background()
        texts = [_as_str(t) for t in batch]
        if not texts:
            return np.zeros(0)
        return self._match(texts, await self.encoder.aembed_many(texts))

    def nearest_family(self, item: Any) -> tuple[float, str]:
        text = _as_str(item)
        with self._lock:
            found = self._recent.get(Encoder._key(text))
        if found is None:
            self.score([text])
            with self._lock:
                found = self._recent.get(Encoder._key(text), (0.0, ""))
        return found

    def reasons(self, item: Any) -> list[str]:
        score, family = self.nearest_family(item)
        return [f"library:{family}"] if family and score > 0 else []


def build_attack_library(options: AttackLibraryOptions) -> AttackLibraryDetector:
    encoder = options.get_encoder()
    path = options.library or default_library_path()
    try:
        detector = AttackLibraryDetector(encoder, path, options.reload_interval_s,
                                         options.min_probe_cosine, options.contrast, options.mode)
    except LibraryError as err:
        raise ValueError(f"library: {err}") from None
    detector.loaded_files = (*encoder.files, detector.path)
    return detector


register("detect.attack_library", "detector", AttackLibraryOptions, build_attack_library)
