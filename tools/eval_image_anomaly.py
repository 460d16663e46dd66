#!/usr/bin/env python3
"""Feature-space anomaly detectors against FGSM / PGD on the Fashion-MNIST demo model; writes
docs/quality-image-anomaly.md (between its GENERATED markers).

Run from the repository root (torch only for the attacks):

    pip install torch==2.13.0          # local CPU wheel; no other torch spec
    python3 tools/eval_image_anomaly.py     # ~20 min on 2 cores (PGD); --help for sizes

What it does

* Data: Debian ``dataset-fashion-mnist`` (60,000 training, 10,000 test images), pixels / 255.
* Model: the shipped ``bastion/demo_models/fashion-mnist/model.onnx``. For gradients the CNN is
  rebuilt in torch (``build_model`` of tools/training/train_fashion_mnist.py) with the ONNX
  initializers loaded; the script stops unless torch and onnxruntime agree (logits and
  ``features``, all test images, max |diff| <= 1e-4).
* Attacks (white-box on the model, not adaptive to the detectors), L-inf, on the test images:
  FGSM (one step of eps) and PGD (Madry et al.: uniform random start in the eps-ball,
  ``--pgd-steps`` steps of 2.5 eps / steps, projected on the ball and [0, 1]), eps 0.1 and 0.3.
* Features: the model's ``features`` output (64-d penultimate ReLU) and its ``conv1_stats``
  output (48 per-channel statistics of the first conv block: mean, std, fraction active),
  computed by onnxruntime on the clean / attacked images: what the upstream returns to
  ``detect.features``, scored by the stage's own ``FeatureAnomalyDetector``. Also the input itself
  (``detect.input_anomaly``): the 784 pixels, and 7x7 average-pooled.
* Detectors (bastion.detectors.anomaly, the stage code): fitted on the 60,000 training images'
  features (class labels = training labels for the class-conditional Mahalanobis).
* Protocol: the first half of the test set (clean) sets each detector's threshold at 5 % FPR
  (``bastion.calibrate.threshold_at_fpr``, as ``bastion calibrate`` does); the second half is
  scored clean and attacked: AUROC (clean vs attacked), and TPR / FPR at that threshold.
  "all" = every attacked image; "successful" = those the model got right clean and wrong
  attacked.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

from generated_doc import write_generated  # tools/ (this script's folder)
from image_attacks import training_module  # the demo CNN's training code
from linf_attack import linf_attack

REPO = pathlib.Path(__file__).resolve().parent.parent
ONNX_PATH = REPO / "bastion" / "demo_models" / "fashion-mnist" / "model.onnx"
DOC = REPO / "docs" / "quality-image-anomaly.md"
TARGET_FPR = 0.05
#: The model's feature outputs scored (``detect.features``'s ``output``).
FEATURE_OUTPUTS = ("features", "conv1_stats")


def onnx_session(threads: int):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(ONNX_PATH), options, providers=["CPUExecutionProvider"])


def onnx_outputs(sess, images: np.ndarray, batch: int = 1000) -> dict[str, np.ndarray]:
    """Every output of the model (logits, features, conv1_stats) for ``images``."""
    names = [o.name for o in sess.get_outputs()]
    parts = [sess.run(names, {"image": images[i:i + batch]}) for i in range(0, len(images), batch)]
    return {name: np.concatenate(column) for name, column in zip(names, zip(*parts))}


def torch_model(train):
    """The demo CNN in torch with the ONNX file's weights."""
    return train.load_onnx_weights(train.build_model(), ONNX_PATH).eval()


def check_rebuild(model, sess, images: np.ndarray) -> float:
    import torch
    worst = 0.0
    for i in range(0, len(images), 1000):
        with torch.no_grad():
            expected = [t.numpy() for t in model(torch.from_numpy(images[i:i + 1000]))]
        served = onnx_outputs(sess, images[i:i + 1000])
        worst = max([worst] + [float(np.abs(t - o).max())
                               for t, o in zip(expected, served.values())])
    if worst > 1e-4:
        raise SystemExit(f"rebuilt torch model differs from the ONNX model (max |diff| {worst:.2e})")
    return worst


def auroc(negative: np.ndarray, positive: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score
    labels = np.r_[np.zeros(len(negative)), np.ones(len(positive))]
    scores = np.r_[negative, positive]
    scores = np.nan_to_num(scores, posinf=np.finfo(np.float64).max)
    return float(roc_auc_score(labels, scores))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--test", type=int, default=10000, help="test images used (<= 10000)")
    parser.add_argument("--pgd-steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--no-doc", action="store_true", help="print, do not write the doc")
    args = parser.parse_args()

    import torch

    from bastion.calibrate import threshold_at_fpr
    from bastion.detectors.anomaly import (FeatureAnomalyDetector, InputAnomalyDetector,
                                           pool_features, save_state)
    from bastion.detectors.anomaly_models import make_model

    torch.set_num_threads(args.threads)
    started = time.time()
    train = training_module()
    x_train_u8, y_train = train.load_split("train")
    x_test_u8, y_test = train.load_split("t10k")
    x_train = (x_train_u8.astype(np.float32) / 255.0)[:, None]
    x_test = (x_test_u8.astype(np.float32) / 255.0)[:args.test, None]
    y_test = y_test[:args.test]

    sess = onnx_session(args.threads)
    model = torch_model(train)
    diff = check_rebuild(model, sess, x_test)
    print(f"torch rebuild vs onnxruntime, {len(x_test)} test images: max |diff| {diff:.2e}",
          flush=True)

    train_out = onnx_outputs(sess, x_train)
    clean_out = onnx_outputs(sess, x_test)
    clean_logits = clean_out["logits"]
    accuracy = float((clean_logits.argmax(1) == y_test).mean())
    print(f"clean test accuracy {accuracy:.4f}", flush=True)

    attacks: dict[str, np.ndarray] = {}
    for eps in (0.1, 0.3):
        for name, steps, start in (("FGSM", 1, False), ("PGD", args.pgd_steps, True)):
            t0 = time.time()
            attacks[f"{name} eps={eps}"] = linf_attack(model, x_test, y_test, eps, steps,
                                                          random_start=start, seed=args.seed)
            print(f"{name} eps={eps}: {time.time() - t0:.0f}s", flush=True)
    attack_outputs = {k: onnx_outputs(sess, v) for k, v in attacks.items()}

    half = len(x_test) // 2
    calib, held = slice(0, half), slice(half, None)

    # Detectors: (name, source, scorer(images, outputs) -> scores)
    detectors = []

    def add_feature_detector(output, name, method, classes=None, class_mode="min", **kw):
        t0 = time.time()
        source = f"upstream:fashion-mnist:{output}"
        m = make_model(method, class_mode=class_mode, **kw).fit(train_out[output], classes)
        # Round-trip through the state file, and score with the stage's detector class.
        path = pathlib.Path("/tmp") / f"bastion-eval-image-{output}-{method}.npz"
        save_state(path, m, source)
        detector = FeatureAnomalyDetector.from_state(path, source, method)
        predicted_mode = class_mode == "predicted"

        def scorer(images, outputs):
            predicted = outputs["logits"].argmax(1) if predicted_mode else None
            return detector.score_features(outputs[output], predicted)
        detectors.append((name, f"`{output}` ({train_out[output].shape[1]}-d)", scorer))
        print(f"fitted {name} on {output} in {time.time() - t0:.1f}s", flush=True)

    for output in FEATURE_OUTPUTS:
        add_feature_detector(output, "Mahalanobis, class-conditional (min over classes)",
                             "mahalanobis", y_train)
        add_feature_detector(output, "Mahalanobis, class-conditional (predicted class)",
                             "mahalanobis", y_train, class_mode="predicted")
        add_feature_detector(output, "Mahalanobis, one Gaussian", "mahalanobis")
        add_feature_detector(output, "kNN k=10 mean", "knn", k=10)
        add_feature_detector(output, "kNN k=1", "knn", k=1)
        add_feature_detector(output, "IsolationForest", "iforest", n_estimators=200)

    for pool, label in ((None, "pixels (784)"), (14, "pixels 14x14 avg-pooled (196)"),
                        (7, "pixels 7x7 avg-pooled (49)")):
        for method in ("mahalanobis", "knn"):
            m = make_model(method, k=10).fit(pool_features(x_train, pool))
            detector = InputAnomalyDetector(m, pool, "input:fashion-mnist:image")

            def scorer(images, outputs, detector=detector):
                return detector.model.score(detector.features(images))
            detectors.append((f"{method} on input", label, scorer))

    rows = []
    for name, source, scorer in detectors:
        clean = scorer(x_test, clean_out)
        threshold = threshold_at_fpr(clean[calib], TARGET_FPR)
        clean_held = clean[held]
        fpr = float(np.mean(clean_held >= threshold))
        for attack, images in attacks.items():
            outputs = attack_outputs[attack]
            scores = scorer(images, outputs)[held]
            success = ((clean_logits[held].argmax(1) == y_test[held])
                       & (outputs["logits"][held].argmax(1) != y_test[held]))
            rows.append({
                "detector": name, "source": source, "attack": attack,
                "attack_success": float(success.mean()),
                "auroc_all": auroc(clean_held, scores),
                "tpr_all": float(np.mean(scores >= threshold)),
                "auroc_succ": auroc(clean_held, scores[success]) if success.any() else float("nan"),
                "tpr_succ": float(np.mean(scores[success] >= threshold)) if success.any() else float("nan"),
                "fpr": fpr,
            })
        print(f"{name} [{source}]: " + ", ".join(
            f"{r['attack']} AUROC {r['auroc_all']:.4f}" for r in rows if r["detector"] == name
            and r["source"] == source), flush=True)

    adv_acc = {k: float((v["logits"].argmax(1) == y_test).mean()) for k, v in attack_outputs.items()}
    lines = render(args, rows, accuracy, adv_acc, diff, time.time() - started)
    text = "\n".join(lines)
    print(text)
    if not args.no_doc:
        write_generated(DOC, text, "Quality: feature-space anomaly detectors on images")


def render(args, rows, accuracy, adv_acc, diff, seconds) -> list[str]:
    import onnxruntime
    import sklearn
    import torch
    out = [
        f"Command: `python3 tools/eval_image_anomaly.py --test {args.test} --pgd-steps "
        f"{args.pgd_steps} --threads {args.threads} --seed {args.seed}` "
        f"({seconds / 60:.1f} min; torch {torch.__version__}, onnxruntime "
        f"{onnxruntime.__version__}, scikit-learn {sklearn.__version__}).",
        "",
        f"Rebuilt torch CNN vs the ONNX model on {args.test} test images: max |diff| {diff:.1e} "
        f"(every output). Clean test accuracy {accuracy:.4f}; under attack: "
        + ", ".join(f"{k} {v:.4f}" for k, v in adv_acc.items()) + ".",
        "",
        f"Threshold per detector: {TARGET_FPR:.0%} FPR on test images 0-{args.test // 2 - 1} "
        f"(clean); everything below is on images {args.test // 2}-{args.test - 1}. "
        "`FPR` = clean held-out images flagged at that threshold.",
        "",
    ]
    for output in FEATURE_OUTPUTS:
        out += [f"### Features the model returns: `{output}` (`detect.features`)", ""]
        out += table([r for r in rows if r["source"].startswith(f"`{output}`")])
        out += [""]
    out += ["### The input itself (`detect.input_anomaly`)", ""]
    out += table([r for r in rows if not r["source"].startswith("`")])
    return out


def table(rows) -> list[str]:
    out = ["| detector | source | attack | attack success | AUROC (all) | TPR@thr (all) | "
           "AUROC (successful) | TPR@thr (successful) | FPR@thr |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['detector']} | {r['source']} | {r['attack']} | "
                   f"{r['attack_success']:.1%} | {r['auroc_all']:.4f} | {r['tpr_all']:.3f} | "
                   f"{r['auroc_succ']:.4f} | {r['tpr_succ']:.3f} | {r['fpr']:.3f} |")
    return out


if __name__ == "__main__":
    sys.exit(main())
