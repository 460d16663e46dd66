"""``detect.classifier``: a trained sequence classifier (exported to ONNX) scores each prompt.

Any Hugging Face sequence-classification checkpoint exported with ``bastion models export
classifier --from DIR`` runs here (fp32 ``model.onnx`` or int8 ``model_int8.onnx``). The model
runs through the shared :class:`~bastion.detectors.encoder.Encoder`: concurrent requests are
micro-batched, long texts are cut into ``max_length``-token windows (at most ``max_chunks``), and
every output of the graph (``logits`` and the pooled ``embedding``) is cached per text, so
``detect.embedding`` and ``detect.attack_library`` on the same folder reuse this stage's run
(when this stage runs with ``early_exit: false``: theirs runs every window to the last layer).

Score: the attack probability, 1 - the softmax probability summed over the benign labels, of
the text's most suspicious window (in [0, 1]). Reason: ``classifier:<label>``, the most likely
non-benign label of that window.

Options: ``model`` (an exported folder; default: the classifier bundled in the package,
``bastion/models/prompt-guard/``), ``variant`` (auto|fp32|int8; auto = int8 where the CPU has
VNNI and the folder has an int8 file, see :mod:`bastion.detectors.cpu_features`),
``benign_labels`` (default: the manifest's, else labels named benign, safe, legit or LABEL_0),
``early_exit`` (default true: where the folder's graph has an early exit, windows scoring below
its fitted gate after the first layers skip the rest, see :mod:`bastion.export.early_exit`; such
a window's score is its exit score, below the gate), and the encoder settings ``providers``,
``threads``, ``max_batch``, ``max_wait_ms``, ``max_chunks``.

Model folder (written by :mod:`bastion.export.classifier`): ``model.onnx``, optional
``model_int8.onnx``, ``tokenizer.json`` and the manifest ``classifier.json`` (``name``,
``labels`` in id order, ``benign_labels``, ``max_length``, ``source``, ``models``). Graph inputs
``input_ids`` and ``attention_mask`` (and ``token_type_ids`` if the model takes them), outputs
``logits`` [batch, labels] and ``embedding`` [batch, hidden].
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from bastion.core.registry import register
from bastion.detectors.base import TextDetector
from bastion.detectors.cpu_features import Variant
from bastion.detectors.encoder import (Encoder, EncoderRuntimeOptions, Outputs, _as_str,
                                       get_encoder, model_file)

__all__ = ["ClassifierDetector", "ClassifierOptions", "bundled_model_dir", "load_manifest",
           "resolve_classifier", "benign_label_names", "BENIGN_NAMES", "MANIFEST"]

MANIFEST = "classifier.json"
BUNDLED_NAME = "prompt-guard"
#: Label names taken as benign when neither the option nor the manifest says (lower case).
BENIGN_NAMES = frozenset({"benign", "safe", "legit", "label_0"})
EXPORT_HINT = "`bastion models export classifier --from CHECKPOINT --out DIR`"


def bundled_model_dir() -> pathlib.Path:
    return pathlib.Path(str(importlib.resources.files("bastion") / "models" / BUNDLED_NAME))


def load_manifest(folder: pathlib.Path) -> dict:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder}: no {MANIFEST} (not a classifier folder; export one "
                                f"with {EXPORT_HINT})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable ({err})") from None
    labels = manifest.get("labels") if isinstance(manifest, dict) else None
    if not isinstance(labels, list) or len(labels) < 2 or not all(
            isinstance(label, str) for label in labels):
        raise ValueError(f"{path}: 'labels' must list the model's label names in id order")
    return manifest


def resolve_classifier(model: str | os.PathLike | None, variant: Variant = "auto"
                       ) -> tuple[pathlib.Path, dict]:
    """(model file, manifest) for a classifier folder (None = the bundled one) or an .onnx
    file in one; errors say what is missing and how to make it."""
    if model is None:
        folder = bundled_model_dir()
        if not folder.is_dir():
            raise FileNotFoundError(
                f"the bundled classifier ({folder}) is not part of this installation; set "
                f"`model:` to a folder written by {EXPORT_HINT}")
    else:
        folder = pathlib.Path(model)
        if not folder.exists():
            raise FileNotFoundError(f"classifier model {folder} does not exist (export one with "
                                    f"{EXPORT_HINT})")
    if folder.is_file():
        return folder, load_manifest(folder.parent)
    manifest = load_manifest(folder)
    path = model_file(folder, variant)
    if not path.exists():
        raise FileNotFoundError(f"{folder}: no {path.name} (re-run {EXPORT_HINT})")
    return path, manifest


def benign_label_names(labels: Sequence[str], chosen: Sequence[str] | None = None,
                       manifest: Sequence[str] | None = None) -> list[str]:
    """The benign labels: ``chosen`` (the option), else the manifest's, else those named like
    :data:`BENIGN_NAMES`. At least one label must be benign and one not."""
    if chosen is not None:
        benign, said = list(chosen), "benign_labels"
    elif manifest:
        benign, said = list(manifest), "the manifest's benign_labels"
    else:
        benign = [label for label in labels if label.lower() in BENIGN_NAMES]
        said = "label names"
    unknown = [label for label in benign if label not in labels]
    if unknown:
        raise ValueError(f"{said}: {', '.join(unknown)} not among the model's labels "
                         f"({', '.join(labels)})")
    if not benign:
        raise ValueError(f"no benign label among the model's labels ({', '.join(labels)}); "
                         "name them with benign_labels")
    if len(set(benign)) == len(labels):
        raise ValueError(f"{said}: every label is benign; nothing would ever score")
    return benign


class ClassifierOptions(EncoderRuntimeOptions):
    #: Exported classifier folder; None = the bundled ``bastion/models/prompt-guard/``.
    model: str | None = None
    variant: Variant = "auto"
    #: Labels whose probability counts as benign; None = the manifest's, else by name.
    benign_labels: list[str] | None = None
    #: Let clearly benign windows leave the model early, where its folder has an exit (the
    #: bundled one does); false = every window runs the whole model.
    early_exit: bool = True


class ClassifierDetector(TextDetector):
    """Attack probability of a text's most suspicious window, from a sequence classifier."""

    is_async = True

    def __init__(self, encoder: Encoder, labels: Sequence[str], benign_labels: Sequence[str]):
        if "logits" not in encoder.outputs:
            raise ValueError(f"{encoder.model_path}: no 'logits' output (the graph has "
                             f"{', '.join(encoder.outputs)}); export it with {EXPORT_HINT}")
        width = next(o.shape[-1] for o in encoder.session.get_outputs() if o.name == "logits")
        if isinstance(width, int) and width != len(labels):
            raise ValueError(f"{encoder.model_path}: {width} logits for {len(labels)} labels")
        self.encoder = encoder
        self.labels = list(labels)
        benign = set(benign_labels)
        self.attack_index = np.array([i for i, label in enumerate(self.labels)
                                      if label not in benign])

    @classmethod
    def from_options(cls, options: ClassifierOptions) -> "ClassifierDetector":
        path, manifest = resolve_classifier(options.model, options.variant)
        labels = manifest["labels"]
        benign = benign_label_names(labels, options.benign_labels, manifest.get("benign_labels"))
        # Only a folder with an exit needs its own encoder setting; any other shares its run
        # with the embedding stages.
        exits = options.early_exit and bool(manifest.get("early_exit"))
        encoder_options = dataclasses.replace(options.encoder_options(), early_exit=exits)
        return cls(get_encoder(path, encoder_options), labels, benign)

    # -- scoring -------------------------------------------------------------------------------

    def verdict(self, outputs: Outputs) -> tuple[float, str]:
        """(attack probability, most likely attack label) of one text's worst window."""
        logits = np.asarray(outputs["logits"], dtype=np.float64)
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=1, keepdims=True)
        # Summing the attack labels is 1 - sum(benign) without the cancellation near 0.
        attack = probabilities[:, self.attack_index]
        per_window = attack.sum(axis=1)
        worst = int(np.argmax(per_window))
        label = self.labels[self.attack_index[int(np.argmax(attack[worst]))]]
        return float(np.clip(per_window[worst], 0.0, 1.0)), label

    def predict(self, batch: Sequence[Any]) -> list[tuple[float, str]]:
        """Blocking: (score, attack label) per text."""
        return [self.verdict(o) for o in self.encoder.outputs_of([_as_str(t) for t in batch])]

    def score(self, batch: Sequence[Any]) -> np.ndarray:
        return np.array([score for score, _ in self.predict(batch)], dtype=np.float64)

    async def ascore(self, batch: Sequence[Any]) -> np.ndarray:
        if not len(batch):
            return np.zeros(0)
        outputs = await self.encoder.aoutputs_many([_as_str(t) for t in batch])
        return np.array([self.verdict(o)[0] for o in outputs], dtype=np.float64)

    def reasons(self, item: Any) -> list[str]:
        text = _as_str(item)
        outputs = self.encoder.cached_outputs(text)
        if outputs is None:
            outputs = self.encoder.outputs_of([text])[0]
        return [f"classifier:{self.verdict(outputs)[1]}"]


def build_classifier(options: ClassifierOptions) -> ClassifierDetector:
    try:
        detector = ClassifierDetector.from_options(options)
    except FileNotFoundError as err:  # configuration errors name the option
        raise ValueError(f"model: {err}") from None
    detector.loaded_files = detector.encoder.files
    return detector


register("detect.classifier", "detector", ClassifierOptions, build_classifier)
