#!/usr/bin/env python3
"""Train the text-source demo classifier (austen / bible / python_docs) and export it to ONNX.

Run from the repository root:

    python3 tools/training/train_text_classifier.py

Training-time dependencies only: scikit-learn, skl2onnx, onnx, onnxruntime, numpy.  The exported
graph takes the raw prompt as an ONNX STRING tensor (``prompt``, shape [batch, 1]) and does the
tokenisation, TF-IDF and logistic regression inside the graph, so the model server only has to
decode the request bytes to text and call onnxruntime -- no Python preprocessing to keep in sync.

Determinism: passage cutting has no randomness; sampling/splitting use ``--seed``; the lbfgs
solver is deterministic, so the same seed gives the same model.
"""
from __future__ import annotations

import argparse
import gzip
import re
from pathlib import Path

import numpy as np

CORPUS_DIR = Path("/work/shared/data/text/corpus")
OUT_DIR = Path("bastion/demo_models/text-classifier")
# Class order = label index.
CLASSES = [("austen", "janeausten_6_novels.txt.gz"),
           ("bible", "world_english_bible.txt.gz"),
           ("python_docs", "python311_docs_rst.txt.gz")]

# Why not sklearn's default token_pattern (?u)\b\w\w+\b: onnxruntime's Tokenizer uses RE2, whose \w
# is ASCII-only, and skl2onnx silently swaps the default for [a-zA-Z0-9_]+ (which also keeps 1-char
# tokens).  Using the same ASCII pattern on both sides makes ONNX tokenisation match sklearn exactly.
TOKEN_PATTERN = r"[a-zA-Z0-9_]{2,}"
SENT_SPLIT = re.compile(r"(?<=[.!?])\s+")
MIN_CHARS, TARGET_CHARS, MAX_SENTENCES = 40, 200, 4


def passages(text: str) -> list[str]:
    """Cut a corpus into passages of 1-4 sentences, ~200 characters, never crossing a paragraph."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        # '##### <title>' lines are file separators added when the corpora were assembled.
        para = " ".join(l for l in para.splitlines() if not l.startswith("##### "))
        words = para.split()
        if not words:
            continue
        sentences = SENT_SPLIT.split(" ".join(words))
        chunk: list[str] = []
        for s in sentences:
            # A run-on "sentence" (code, tables, long verses) is cut at word boundaries.
            while len(s) > 2 * TARGET_CHARS:
                cut = s.rfind(" ", 0, TARGET_CHARS)
                cut = cut if cut > 0 else TARGET_CHARS
                out.append(s[:cut])
                s = s[cut:].lstrip()
            chunk.append(s)
            if len(" ".join(chunk)) >= TARGET_CHARS or len(chunk) >= MAX_SENTENCES:
                out.append(" ".join(chunk))
                chunk = []
        if chunk:
            out.append(" ".join(chunk))
    return [p for p in out if len(p) >= MIN_CHARS]


def load_dataset(max_per_class: int, rng: np.random.Generator) -> tuple[list[str], np.ndarray]:
    texts, labels, seen = [], [], set()
    for label, (name, fname) in enumerate(CLASSES):
        with gzip.open(CORPUS_DIR / fname, "rt", encoding="utf-8") as f:
            ps = passages(f.read())
        # Drop exact duplicates (repeated verses, boilerplate) so no passage is in train and test.
        uniq = [p for p in dict.fromkeys(ps) if p not in seen]
        seen.update(uniq)
        # Cap each class so the much larger Python docs corpus does not dominate the prior.
        if len(uniq) > max_per_class:
            uniq = [uniq[i] for i in sorted(rng.choice(len(uniq), max_per_class, replace=False))]
        print(f"{name}: {len(ps)} passages, {len(uniq)} used")
        texts += uniq
        labels += [label] * len(uniq)
    return texts, np.array(labels, dtype=np.int64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", type=Path, default=OUT_DIR)
    ap.add_argument("--max-per-class", type=int, default=15000)
    ap.add_argument("--max-features", type=int, default=5000)
    ap.add_argument("--test-fraction", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()

    import onnxruntime as ort
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import StringTensorType
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import Pipeline

    rng = np.random.default_rng(args.seed)
    texts, y = load_dataset(args.max_per_class, rng)
    x_train, x_test, y_train, y_test = train_test_split(
        texts, y, test_size=args.test_fraction, random_state=args.seed, stratify=y)

    pipe = Pipeline([
        # Word uni+bigrams: char n-grams are not reliably convertible by skl2onnx (char_wb is
        # unsupported, 'char' only "may work"), and word n-grams already separate these sources.
        # sublinear_tf stays off: skl2onnx 1.20 exports it as log(1+tf) instead of sklearn's
        # 1+log(tf), so the ONNX probabilities would drift from sklearn's.
        ("tfidf", TfidfVectorizer(lowercase=True, token_pattern=TOKEN_PATTERN, ngram_range=(1, 2),
                                  max_features=args.max_features, dtype=np.float32)),
        ("clf", LogisticRegression(C=4.0, max_iter=2000)),
    ])
    pipe.fit(x_train, y_train)
    sk_pred = pipe.predict(x_test)
    sk_proba = pipe.predict_proba(x_test)

    onx = to_onnx(
        pipe, initial_types=[("prompt", StringTensorType([None, 1]))], target_opset=17,
        # zipmap=False: plain probability tensor instead of a sequence of maps; tokenexp makes the
        # ONNX Tokenizer use our (RE2-compatible) token_pattern verbatim.  locale="C": the default
        # (en_US.UTF-8) makes onnxruntime's StringNormalizer fail at session creation on hosts
        # without that locale installed (most containers); tokens are ASCII-only, so "C" lowercases
        # everything that matters.
        options={id(pipe.steps[1][1]): {"zipmap": False},
                 id(pipe.steps[0][1]): {"tokenexp": TOKEN_PATTERN, "locale": "C"}},
    )
    out_names = [o.name for o in onx.graph.output]
    if out_names != ["label", "probabilities"]:
        raise SystemExit(f"unexpected ONNX outputs {out_names}")
    onx.doc_string = "Bastion demo: text source classifier (austen, bible, python_docs)"
    # skl2onnx emits opset imports in set order (varies with PYTHONHASHSEED); sort them so the
    # file is byte-for-byte reproducible.
    opsets = sorted(((o.domain, o.version) for o in onx.opset_import))
    del onx.opset_import[:]
    for domain, version in opsets:
        onx.opset_import.add(domain=domain, version=version)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = args.out_dir / "model.onnx"
    onnx_path.write_bytes(onx.SerializeToString())
    (args.out_dir / "labels.txt").write_text("\n".join(name for name, _ in CLASSES) + "\n")

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    label, proba = sess.run(["label", "probabilities"],
                            {"prompt": np.array(x_test, dtype=object).reshape(-1, 1)})
    agree = (label == sk_pred).mean()
    max_diff = np.abs(proba - sk_proba).max()
    # Edge cases the server will see: empty prompt, prompt with no tokens, non-ASCII text.
    for probe in ["", "!!! ??? ...", "Élise a mangé 🍰 — naïve café"]:
        lab, pr = sess.run(None, {"prompt": np.array([[probe]], dtype=object)})
        sk = pipe.predict_proba([probe])[0]
        print(f"probe {probe!r}: onnx {lab[0]} {np.round(pr[0], 4)}  sklearn {np.round(sk, 4)}")

    for io in sess.get_inputs() + sess.get_outputs():
        print(f"  {io.name}: {io.type} {io.shape}")
    n_features = len(pipe.steps[0][1].vocabulary_)
    print(f"features: {n_features}, train passages: {len(x_train)}, test passages: {len(x_test)}")
    print(f"test accuracy (sklearn):     {(sk_pred == y_test).mean():.4f}")
    print(f"test accuracy (onnxruntime): {(label == y_test).mean():.4f}")
    print(f"onnx/sklearn label agreement: {agree:.4f}, max |proba diff|: {max_diff:.2e}")
    print(f"wrote {onnx_path} ({onnx_path.stat().st_size} bytes), labels.txt")
    if agree < 1.0:
        raise SystemExit("ONNX predictions differ from sklearn")


if __name__ == "__main__":
    main()
