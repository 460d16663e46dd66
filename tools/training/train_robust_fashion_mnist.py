#!/usr/bin/env python3
"""PGD adversarial training (Madry et al. 2018) of the demo CNN: ``fashion-mnist-robust``, the
baseline the image profile is compared with (docs/quality-image-defense.md).

Same architecture and graph outputs as the demo model (tools/training/train_fashion_mnist.py),
started from the demo model's weights and trained on PGD L-inf examples only (``--eps``,
``--steps`` steps of 2.5 eps / steps from a random start, recomputed every batch). The export
goes next to the demo model, so `bastion upstream` serves it as model ``fashion-mnist-robust``:

    python3 tools/training/train_robust_fashion_mnist.py      # torch==2.13.0 CPU wheel
"""
from __future__ import annotations

import argparse
import pathlib
import time
import warnings

import numpy as np

from bastion.options import add_options

REPO = pathlib.Path(__file__).resolve().parents[2]
DEMO = REPO / "bastion" / "demo_models" / "fashion-mnist" / "model.onnx"
OUT = REPO / "bastion" / "demo_models" / "fashion-mnist-robust" / "model.onnx"


def pgd_batch(model, x, y, eps: float, steps: int, generator):
    import torch
    import torch.nn.functional as F
    step = 2.5 * eps / steps
    adv = (x + (torch.rand(x.shape, generator=generator) * 2 - 1) * eps).clamp(0, 1)
    for _ in range(steps):
        adv.requires_grad_(True)
        grad, = torch.autograd.grad(F.cross_entropy(model(adv)[0], y), adv)
        with torch.no_grad():
            adv = torch.min(torch.max(adv + step * grad.sign(), x - eps), x + eps).clamp(0, 1)
    return adv.detach()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_options(ap, epochs=10, eps=0.1, steps=7, batch_size=128, lr=5e-4, seed=1234, threads=2,
                out=OUT)
    args = ap.parse_args()

    import onnxruntime as ort
    import torch
    import torch.nn.functional as F

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    import train_fashion_mnist as train  # tools/training (this script's folder)
    x_train_u8, y_train = train.load_split("train")
    x_test_u8, y_test = train.load_split("t10k")
    x_train = torch.from_numpy(x_train_u8.astype(np.float32) / 255.0).unsqueeze(1)
    x_test = torch.from_numpy(x_test_u8.astype(np.float32) / 255.0).unsqueeze(1)
    y_train_t, y_test_t = torch.from_numpy(y_train), torch.from_numpy(y_test)

    model = train.load_onnx_weights(train.build_model(), DEMO)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    batches = (len(x_train) + args.batch_size - 1) // args.batch_size
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * batches)
    generator = torch.Generator().manual_seed(args.seed)
    started = time.time()
    for epoch in range(args.epochs):
        order = torch.randperm(len(x_train), generator=generator)
        total = 0.0
        for i in range(0, len(order), args.batch_size):
            rows = order[i:i + args.batch_size]
            model.eval()  # no dropout/batch-norm: eval vs train only matters for clarity
            adv = pgd_batch(model, x_train[rows], y_train_t[rows], args.eps, args.steps, generator)
            model.train()
            loss = F.cross_entropy(model(adv)[0], y_train_t[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(rows)
        model.eval()
        with torch.no_grad():
            clean = (model(x_test)[0].argmax(1) == y_test_t).float().mean().item()
        robust = (model(pgd_batch(model, x_test[:1000], y_test_t[:1000], args.eps, 20,
                                  generator))[0].argmax(1) == y_test_t[:1000]).float().mean().item()
        print(f"epoch {epoch + 1}/{args.epochs}: adversarial loss {total / len(order):.4f}, "
              f"clean test acc {clean:.4f}, PGD-20 eps {args.eps} acc (1000) {robust:.4f} "
              f"[{time.time() - started:.0f}s]", flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export",
                            category=DeprecationWarning)
    torch.onnx.export(model, (x_test[:2],), str(args.out), dynamo=False, opset_version=17,
                      input_names=["image"], output_names=list(train.OUTPUTS),
                      dynamic_axes={n: {0: "batch"} for n in ("image", *train.OUTPUTS)})
    (args.out.parent / "labels.txt").write_text(
        (DEMO.parent / "labels.txt").read_text())
    session = ort.InferenceSession(str(args.out), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(x_test[:2000])[0].numpy()
    served = session.run(["logits"], {"image": x_test[:2000].numpy()})[0]
    print(f"wrote {args.out}; max |onnx - torch| logits {np.abs(served - expected).max():.2e}")


if __name__ == "__main__":
    main()
