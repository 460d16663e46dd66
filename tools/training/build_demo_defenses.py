#!/usr/bin/env python3
"""Build what `bastion demo` needs to show the image defenses, next to the demo CNN:

* ``adversarial.npz``: FGSM and PGD-40 (L-inf, ``--eps``) copies of the 64 sample images
  (``samples.npz``), white-box on the shipped ONNX model, stored as uint8 like the samples;
* ``conv1_stats.state.npz`` and ``conv1_stats.threshold.json``: the fitted state and threshold
  of the demo's ``detect.features`` stage (class-conditional Mahalanobis on ``conv1_stats``),
  made by the real ``bastion calibrate`` against ``bastion upstream`` on Fashion-MNIST
  *training* images, so the demo's sample and attack images were never fitted on.

Run from the repository root (torch only for the attacks; data from Debian's
``dataset-fashion-mnist``):

    pip install torch==2.13.0
    python3 tools/training/build_demo_defenses.py

The calibration images go through the demo pipeline's request transform first
(``transform.bit_depth: {bits: 5}``, the very class the sidecar runs), because the stage scores
what the upstream answers for the *transformed* image.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / "bastion" / "demo_models" / "fashion-mnist"
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "tools" / "training"))
sys.path.insert(0, str(REPO))

from tests.harness import Upstream  # noqa: E402

# Must equal the image pipeline of the shipped image-classifier profile (tests/test_demo.py checks).
DEMO_BIT_DEPTH = 5
CALIBRATE_CONFIG = """\
upstream: {{target: "{upstream}"}}
models:
  fashion-mnist:
    pipeline:
      - detect.features: {{id: features, output: conv1_stats, method: mahalanobis,
                          class_conditional: true, state: "{state}"}}
"""


def adversarial_samples(eps: float, seed: int) -> None:
    import torch
    import train_fashion_mnist as train
    from linf_attack import linf_attack
    torch.set_num_threads(1)
    model = train.load_onnx_weights(train.build_model(), MODEL_DIR / "model.onnx").eval()
    with np.load(MODEL_DIR / "samples.npz") as data:
        images = (data["images_uint8"].astype(np.float32) / 255.0)
        labels = data["labels"]
    attacks = {"fgsm": dict(steps=1), "pgd": dict(steps=40, random_start=True, seed=seed)}
    out, families, truth = [], [], []
    for family, kwargs in attacks.items():
        adv = linf_attack(model, images, labels, eps, **kwargs)
        # uint8 like the samples; rounding keeps every pixel within eps + 0.5/255 of the clean one
        out.append(np.clip(np.rint(adv * 255), 0, 255).astype(np.uint8))
        families += [family] * len(images)
        truth.append(labels)
    adv_u8 = np.concatenate(out)
    with torch.no_grad():
        predicted = model(torch.from_numpy(adv_u8.astype(np.float32) / 255))[0].argmax(1).numpy()
    truth = np.concatenate(truth)
    np.savez_compressed(MODEL_DIR / "adversarial.npz", images_uint8=adv_u8, labels=truth,
                        family=np.array(families), eps=np.float32(eps))
    for family in attacks:
        rows = np.array(families) == family
        print(f"{family} eps={eps}: model wrong on {np.mean(predicted[rows] != truth[rows]):.2f} "
              f"of {rows.sum()} (after uint8 rounding)")


def features_state(count: int, target_fpr: float, seed: int) -> None:
    import train_fashion_mnist as train

    from bastion.transforms.image import BitDepth
    from bastion.transforms.base import TransformContext
    images_u8, labels = train.load_split("train")
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(images_u8), size=count, replace=False)
    images = images_u8[rows, None].astype(np.float32) / 255.0
    context = TransformContext("build", "image", "FP32")
    squeezed = BitDepth(DEMO_BIT_DEPTH).apply(images, context).array
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        np.savez(tmp / "benign.npz", image=squeezed.astype(np.float32), labels=labels[rows])
        upstream = Upstream()  # `bastion upstream` on a free port (tests/harness.py)
        try:
            config = tmp / "calibrate.yaml"
            config.write_text(CALIBRATE_CONFIG.format(
                upstream=upstream.address, state=MODEL_DIR / "conv1_stats.state.npz"))
            subprocess.run([sys.executable, "-m", "bastion", "calibrate", "-c", str(config),
                            "--model", "fashion-mnist", "--stage", "features", "--data",
                            str(tmp / "benign.npz"), "--target-fpr", str(target_fpr),
                            "--seed", str(seed),
                            "--out", str(MODEL_DIR / "conv1_stats.threshold.json")],
                           check=True)
        finally:
            upstream.stop()
    # The record says what was fitted, without this machine's temporary paths.
    out = MODEL_DIR / "conv1_stats.threshold.json"
    record = json.loads(out.read_text())
    record["data"] = (f"{count} Fashion-MNIST training images (seed {seed}), bit depth "
                      f"{DEMO_BIT_DEPTH}, with labels")
    record["fit"] = (f"fitted on {count // 2} of them through `bastion upstream`, state "
                     "conv1_stats.state.npz (tools/training/build_demo_defenses.py)")
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--count", type=int, default=20000,
                    help="training images for calibrate (half fit, half threshold)")
    ap.add_argument("--target-fpr", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    adversarial_samples(args.eps, args.seed)
    features_state(args.count, args.target_fpr, args.seed)


if __name__ == "__main__":
    main()
