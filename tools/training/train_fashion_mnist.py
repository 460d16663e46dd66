#!/usr/bin/env python3
"""Train the Fashion-MNIST demo CNN and export it to ONNX.

Run from the repository root:

    python3 tools/training/train_fashion_mnist.py

Training-time dependencies only (the model server needs just onnxruntime):
``torch==2.13.0`` (CPU wheel), ``onnx``, ``onnxruntime``, ``numpy``.  Data comes from the
Debian package ``dataset-fashion-mnist`` (MIT / Expat, Zalando SE).

The exported graph has two more outputs besides ``logits``, because Bastion's feature-space
detectors (``detect.features``) need an embedding and the model server should not have to run
a second model to get one:

* ``features``: the 64-d penultimate activations (Lee et al. 2018's usual choice);
* ``conv1_stats``: 48 statistics of the first conv block's ReLU maps, per channel the spatial
  mean, standard deviation and fraction of active units. Low-level statistics see the
  high-frequency noise of small L-inf perturbations, which the penultimate layer maps onto
  ordinary class features (docs/quality-image-anomaly.md measures both);
* ``conv2_stats``: the same 96 statistics of the second conv block's ReLU maps (added later
  with ``--from-onnx``, same weights: the multi-layer ensemble of ``detect.feature_ensemble``,
  docs/quality-image-ensemble.md).

``--from-onnx PATH`` skips training and re-exports the weights of an existing export, so an
output can be added without changing the model's answers.

Determinism: with the same seed, torch version and thread count the script produces the same
weights.  Thread count matters because CPU conv kernels split reductions across threads, so we
pin it (``--threads``) instead of taking whatever the machine offers.
"""
from __future__ import annotations

import argparse
import gzip
import random
import time
import warnings
from pathlib import Path

import numpy as np

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
OUT_DIR = Path("bastion/demo_models/fashion-mnist")
LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
          "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
N_SAMPLES = 64  # test images shipped for the demo traffic generator and tests
OUTPUTS = ("logits", "features", "conv1_stats", "conv2_stats")


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (big-endian header: magic, then one uint32 per dimension)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte payload; the low byte is the rank
        raise ValueError(f"{path}: unsupported IDX type 0x{magic:08x}")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(DATA_DIR / f"{split}-images-idx3-ubyte.gz")
    labels = read_idx(DATA_DIR / f"{split}-labels-idx1-ubyte.gz")
    return images, labels.astype(np.int64)


def activation_stats(maps):
    """Per channel of [N, C, H, W] ReLU maps: spatial mean, standard deviation and fraction of
    units > 0, as [N, 3C] (written with plain ops so the ONNX export is a few reduce nodes)."""
    import torch
    mean = maps.mean(dim=(2, 3))
    std = (maps - mean[:, :, None, None]).pow(2).mean(dim=(2, 3)).sqrt()
    active = (maps > 0).to(maps.dtype).mean(dim=(2, 3))
    return torch.cat([mean, std, active], dim=1)


def load_onnx_weights(model, path: Path):
    """Load the initializers of an earlier export into ``model`` (names must match)."""
    import onnx
    import torch
    from onnx import numpy_helper
    weights = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy())
               for i in onnx.load(str(path)).graph.initializer}
    state = model.state_dict()
    if set(state) != set(weights):
        raise SystemExit(f"{path}: initializers {sorted(weights)} do not match the torch "
                         f"parameters {sorted(state)}")
    model.load_state_dict(weights)
    return model


def build_model():
    import torch
    from torch import nn

    class FashionCNN(nn.Module):
        """2 conv blocks -> 64-unit dense (ReLU) -> 10-way linear head.

        Returns (logits, features, conv1_stats, conv2_stats), all exported as graph outputs.
        """

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 16x14x14
                nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 32x7x7
                nn.Flatten(),
            )
            self.fc = nn.Sequential(nn.Linear(32 * 7 * 7, 64), nn.ReLU())
            self.head = nn.Linear(64, 10)

        def forward(self, image: torch.Tensor):
            conv1 = self.conv[1](self.conv[0](image))           # first block's ReLU maps
            conv2 = self.conv[4](self.conv[3](self.conv[2](conv1)))  # second block's ReLU maps
            features = self.fc(self.conv[5:](conv2))
            return self.head(features), features, activation_stats(conv1), activation_stats(conv2)

    return FashionCNN()


def train(model, x_train, y_train_t, x_test, y_test, args) -> None:
    import torch
    from torch import nn

    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(args.seed)  # own generator: shuffling order depends only on the seed

    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        total = 0.0
        for i in range(0, len(perm), args.batch_size):
            idx = perm[i:i + args.batch_size]
            logits = model(x_train[idx])[0]
            loss = loss_fn(logits, y_train_t[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        model.eval()
        with torch.no_grad():
            acc = (model(x_test)[0].argmax(1).numpy() == y_test).mean()
        print(f"epoch {epoch + 1}/{args.epochs}: train loss {total / len(perm):.4f}  "
              f"test acc (torch) {acc:.4f}  [{time.time() - t0:.0f}s]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", type=Path, default=OUT_DIR)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--from-onnx", type=Path,
                    help="no training: re-export the weights of this earlier export")
    args = ap.parse_args()

    import onnxruntime as ort
    import torch

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)

    x_train_u8, y_train = load_split("train")
    x_test_u8, y_test = load_split("t10k")
    # The ONNX contract is "pixels in [0,1]": no mean/std normalisation, so clients only divide by 255.
    x_train = torch.from_numpy(x_train_u8.astype(np.float32) / 255.0).unsqueeze(1)
    x_test = torch.from_numpy(x_test_u8.astype(np.float32) / 255.0).unsqueeze(1)
    y_train_t = torch.from_numpy(y_train)

    model = build_model()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params}")
    if args.from_onnx:
        load_onnx_weights(model, args.from_onnx)
        print(f"weights from {args.from_onnx}, not trained")
    else:
        train(model, x_train, y_train_t, x_test, y_test, args)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = args.out_dir / "model.onnx"
    model.eval()
    # dynamo=False: the TorchScript exporter needs no extra packages (the dynamo one needs onnxscript)
    # and writes a single self-contained file, which is what we commit.
    warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
    torch.onnx.export(
        model, (x_test[:2],), str(onnx_path), dynamo=False, opset_version=17,
        input_names=["image"], output_names=list(OUTPUTS),
        dynamic_axes={name: {0: "batch"} for name in ("image", *OUTPUTS)},
    )
    (args.out_dir / "labels.txt").write_text("\n".join(LABELS) + "\n")
    np.savez_compressed(args.out_dir / "samples.npz",
                        images_uint8=x_test_u8[:N_SAMPLES, None, :, :],
                        labels=y_test[:N_SAMPLES])

    # Verify the exported graph against torch, and report accuracy as served by onnxruntime.
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x_np = x_test.numpy()
    with torch.no_grad():
        expected = [t.numpy() for t in model(x_test)]
    served = [np.concatenate(parts) for parts in zip(*(
        sess.run(list(OUTPUTS), {"image": x_np[i:i + 1000]}) for i in range(0, len(x_np), 1000)))]
    max_diff = max(float(np.abs(o - t).max()) for o, t in zip(served, expected))
    onnx_acc = (served[0].argmax(1) == y_test).mean()
    print(f"max |onnx - torch| over test set: {max_diff:.2e}")
    if max_diff > 1e-4:
        raise SystemExit("ONNX export does not match torch within 1e-4")
    for io in sess.get_inputs() + sess.get_outputs():
        print(f"  {io.name}: {io.type} {io.shape}")
    print(f"test accuracy (onnxruntime, {len(y_test)} images): {onnx_acc:.4f}")
    print(f"wrote {onnx_path} ({onnx_path.stat().st_size} bytes), labels.txt, samples.npz")


if __name__ == "__main__":
    main()
