"""A `bastion replay` corpus of Fashion-MNIST test images (Debian's dataset-fashion-mnist):
DIR/images.npz plus DIR/clean.jsonl, one benign tensor record per image with its true `class`.

    python3 tools/image_corpus.py --out /tmp/fmnist --count 100 --correct-only

``--correct-only`` keeps the first COUNT test images the demo model classifies correctly (the
images an attack suite starts from); otherwise the first COUNT test images.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.harness import fashion_mnist  # noqa: E402

MODEL = REPO / "bastion" / "demo_models" / "fashion-mnist" / "model.onnx"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--correct-only", action="store_true")
    args = parser.parse_args()
    images, labels = fashion_mnist("t10k")
    chosen = np.arange(len(images))
    if args.correct_only:
        import onnxruntime as ort
        session = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
        logits = session.run(["logits"], {"image": images})[0]
        chosen = np.flatnonzero(logits.argmax(axis=1) == labels)
    chosen = chosen[:args.count]
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out / "images.npz", images=images[chosen])
    with (args.out / "clean.jsonl").open("w") as handle:
        for row, index in enumerate(chosen):
            handle.write(json.dumps({"tensor": f"images.npz#images[{row}]", "label": "benign",
                                     "family": "clean", "class": int(labels[index]),
                                     "id": f"t10k-{index}"}) + "\n")
    print(f"{len(chosen)} images -> {args.out}/clean.jsonl")


if __name__ == "__main__":
    main()
