"""A linear model over hashed character and word n-grams, fitted like a scikit-learn estimator.

Why it is in the text defense: held out by source (docs/quality-prompt-guard.md), a logistic
regression on TF-IDF of character 3-6-grams and word 1-3-grams ranks unseen attack kits about
as well as the fine-tuned encoder (AUROC 0.95-0.98 per family) for a quarter of its CPU, and
refits in a minute, so a team can train it on its own traffic. Its weakness, measured there:
benign registers it never saw look like attacks to surface features.

The features are stateless (``HashingVectorizer``: no vocabulary to ship); the fitted state is
the inverse document frequencies, the coefficients and the intercept, saved as one ``.npz``
with its settings, so loading never unpickles code.

Long texts are scored per window of ``window_chars`` characters (half-overlapping, at most
``max_windows`` spread over the text) and the text's score is its worst window's: an
instruction hidden in a long document is not diluted by the document, and a long benign
document is judged by windows the size of the texts the model learned from.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

__all__ = ["NgramClassifier", "text_windows", "FORMAT"]

FORMAT = "bastion-ngram-1"


def text_windows(text: str, window_chars: int, max_windows: int) -> list[str]:
    """The text itself when it fits one window; else half-overlapping windows, at most
    ``max_windows`` of them spread evenly from the first character to the last."""
    if len(text) <= window_chars:
        return [text]
    step = window_chars // 2
    last = len(text) - window_chars
    starts = list(range(0, last, step)) + [last]
    if len(starts) > max_windows:
        picks = np.linspace(0, len(starts) - 1, max_windows).round().astype(int)
        starts = [starts[i] for i in picks]
    return [text[s:s + window_chars] for s in starts]


@dataclasses.dataclass
class NgramClassifier:
    """Binary attack-vs-benign scorer. ``fit(texts, y, sample_weight)``,
    ``decision_function(texts)``, ``predict_proba(texts)[:, 1]``, ``save``/``load``."""

    char_ngrams: tuple[int, int] = (3, 6)
    word_ngrams: tuple[int, int] = (1, 3)
    hash_bits: int = 18
    C: float = 16.0
    window_chars: int = 2000
    max_windows: int = 16
    idf_: np.ndarray | None = dataclasses.field(default=None, repr=False)
    coef_: np.ndarray | None = dataclasses.field(default=None, repr=False)
    intercept_: float = 0.0

    # -- features ------------------------------------------------------------------------------

    def _vectorizers(self):
        if getattr(self, "_cached_vectorizers", None) is None:
            self._cached_vectorizers = self._make_vectorizers()
        return self._cached_vectorizers

    def _make_vectorizers(self):
        from sklearn.feature_extraction.text import HashingVectorizer
        size = 2 ** self.hash_bits
        chars = HashingVectorizer(analyzer="char", ngram_range=tuple(self.char_ngrams),
                                  n_features=size, alternate_sign=False, norm=None)
        words = HashingVectorizer(analyzer="word", ngram_range=tuple(self.word_ngrams),
                                  n_features=size, alternate_sign=False, norm=None,
                                  token_pattern=r"(?u)\b\w+\b")
        return chars, words

    def counts(self, texts: Sequence[str]) -> sp.csr_matrix:
        """Raw n-gram counts, character features then word features."""
        chars, words = self._vectorizers()
        return sp.hstack([chars.transform(texts), words.transform(texts)], format="csr")

    def _weighted(self, counts: sp.csr_matrix) -> sp.csr_matrix:
        """Sublinear TF times IDF, each row scaled to unit length."""
        x = counts.astype(np.float64, copy=True)
        x.data = (1.0 + np.log(x.data)) * self.idf_[x.indices]
        norms = np.sqrt(np.add.reduceat(x.data ** 2, x.indptr[:-1])) if x.nnz else None
        lengths = np.diff(x.indptr)
        if norms is not None:
            norms = np.where(lengths > 0, norms, 1.0)  # reduceat of an empty row is garbage
            x.data /= np.repeat(norms, lengths)
        return x

    # -- estimator -----------------------------------------------------------------------------

    def fit(self, texts: Sequence[str], y: Sequence[int], sample_weight=None
            ) -> "NgramClassifier":
        """Fit on whole texts (a text longer than a window trains on each of its windows, with
        its label and weight)."""
        from sklearn.linear_model import LogisticRegression
        rows, labels, weights = [], [], []
        weight = np.ones(len(texts)) if sample_weight is None else np.asarray(sample_weight)
        for text, label, w in zip(texts, y, weight):
            parts = text_windows(text, self.window_chars, self.max_windows)
            rows += parts
            labels += [int(label)] * len(parts)
            weights += [float(w) / len(parts)] * len(parts)
        counts = self.counts(rows)
        documents = np.bincount(counts.indices, minlength=counts.shape[1])
        self.idf_ = (np.log((1 + len(rows)) / (1 + documents)) + 1.0).astype(np.float32)
        model = LogisticRegression(C=self.C, max_iter=500, solver="liblinear", random_state=0)
        model.fit(self._weighted(counts), np.asarray(labels), sample_weight=np.asarray(weights))
        self.coef_ = model.coef_.ravel().astype(np.float32)
        self.intercept_ = float(model.intercept_[0])
        return self

    def _check_fitted(self) -> None:
        if self.coef_ is None or self.idf_ is None:
            raise ValueError("NgramClassifier is not fitted (fit it or load a saved model)")

    def window_scores(self, texts: Sequence[str]) -> np.ndarray:
        """Decision values (log-odds) of every text taken whole, no windowing."""
        self._check_fitted()
        if not len(texts):
            return np.zeros(0)
        return self._weighted(self.counts(texts)) @ self.coef_.astype(np.float64) \
            + self.intercept_

    def decision_function(self, texts: Sequence[str]) -> np.ndarray:
        """Log-odds of attack per text: its worst window's."""
        windows, owner = [], []
        for index, text in enumerate(texts):
            parts = text_windows(text, self.window_chars, self.max_windows)
            windows += parts
            owner += [index] * len(parts)
        values = self.window_scores(windows)
        out = np.full(len(texts), -np.inf)
        np.maximum.at(out, np.asarray(owner, dtype=np.int64), values)
        return out

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        p = 1.0 / (1.0 + np.exp(-np.clip(self.decision_function(texts), -500, 500)))
        return np.column_stack([1.0 - p, p])

    # -- persistence ---------------------------------------------------------------------------

    def settings(self) -> dict:
        return {"format": FORMAT, "char_ngrams": list(self.char_ngrams),
                "word_ngrams": list(self.word_ngrams), "hash_bits": self.hash_bits,
                "C": self.C, "window_chars": self.window_chars, "max_windows": self.max_windows}

    def save(self, path: str | os.PathLike, **metadata) -> None:
        self._check_fitted()
        header = dict(self.settings(), **metadata)
        with open(path, "wb") as handle:
            np.savez_compressed(handle, idf=self.idf_, coef=self.coef_,
                                intercept=np.array([self.intercept_]),
                                settings=np.array(json.dumps(header)))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "NgramClassifier":
        try:
            with np.load(path, allow_pickle=False) as data:
                header = json.loads(str(data["settings"]))
                idf, coef = data["idf"], data["coef"]
                intercept = float(data["intercept"][0])
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such n-gram model file") from None
        except (OSError, KeyError, ValueError) as err:
            raise ValueError(f"{path}: not an n-gram model file ({err})") from None
        if header.get("format") != FORMAT:
            raise ValueError(f"{path}: format {header.get('format')!r}, expected {FORMAT!r}")
        model = cls(char_ngrams=tuple(header["char_ngrams"]),
                    word_ngrams=tuple(header["word_ngrams"]), hash_bits=int(header["hash_bits"]),
                    C=float(header["C"]), window_chars=int(header["window_chars"]),
                    max_windows=int(header["max_windows"]))
        size = 2 * 2 ** model.hash_bits
        if idf.shape != (size,) or coef.shape != (size,):
            raise ValueError(f"{path}: arrays of {idf.shape}/{coef.shape}, expected ({size},)")
        model.idf_, model.coef_, model.intercept_ = idf, coef, intercept
        return model
