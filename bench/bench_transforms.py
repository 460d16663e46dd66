"""CPU time per call of each image transform (and validate.tensor), as a Markdown table.

Inputs: a batch of 1 and of 32 Fashion-MNIST-sized images (N x 1 x 28 x 28, float32 in [0, 1])
and one 3 x 224 x 224 float32 image (ImageNet-sized, batch of 1). Each cell repeats
``Transform.apply`` until at least ``--min-cpu`` seconds of CPU time (time.process_time, which
counts every thread of this process) and ``--min-reps`` calls have passed, after a few warm-up
calls, and reports CPU microseconds per call and per image.

    python bench/bench_transforms.py [--min-cpu 0.5] [--min-reps 20] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bastion.transforms.base import TransformContext  # noqa: E402
from bastion.transforms.image import BitDepth, Jpeg, Median, Noise  # noqa: E402
from bastion.transforms.validate import TensorSpec, ValidateTensor  # noqa: E402

TRANSFORMS = {
    "bit_depth (bits=5)": lambda: BitDepth(5),
    "median (k=3)": lambda: Median(3),
    "jpeg (quality=75)": lambda: Jpeg(75),
    "noise (sigma=0.05)": lambda: Noise(0.05),
    "validate.tensor (shape, range, finite)": lambda: ValidateTensor(
        TensorSpec("FP32", (-1, -1, -1, -1), 0.0, 1.0, True)),
}
INPUTS = {
    "1 x 1x28x28": (1, 1, 28, 28),
    "32 x 1x28x28": (32, 1, 28, 28),
    "1 x 3x224x224": (1, 3, 224, 224),
}


def measure(transform, array: np.ndarray, min_cpu: float, min_reps: int) -> tuple[float, int]:
    """CPU seconds per call and the number of calls measured."""
    for warm in range(3):
        transform.apply(array, TransformContext(f"warm-{warm}", "image", "FP32"))
    contexts = [TransformContext(f"req-{i}", "image", "FP32") for i in range(64)]
    reps = 0
    start = time.process_time()
    elapsed = 0.0
    while reps < min_reps or elapsed < min_cpu:
        for _ in range(10):
            transform.apply(array, contexts[reps % len(contexts)])
            reps += 1
        elapsed = time.process_time() - start
    return elapsed / reps, reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--min-cpu", type=float, default=0.5,
                        help="CPU seconds to spend per cell at least (default 0.5)")
    parser.add_argument("--min-reps", type=int, default=20,
                        help="calls per cell at least (default 20)")
    parser.add_argument("--json", type=pathlib.Path, help="also write the results here")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    arrays = {name: rng.random(shape, dtype=np.float32) for name, shape in INPUTS.items()}
    arrays = {name: a.copy() for name, a in arrays.items()}
    for array in arrays.values():
        array.flags.writeable = False  # as decoded request tensors are

    rows = []
    for transform_name, factory in TRANSFORMS.items():
        transform = factory()
        for input_name, array in arrays.items():
            per_call, reps = measure(transform, array, args.min_cpu, args.min_reps)
            rows.append({"transform": transform_name, "input": input_name,
                         "images": array.shape[0], "reps": reps,
                         "cpu_us_per_call": per_call * 1e6,
                         "cpu_us_per_image": per_call * 1e6 / array.shape[0]})

    import PIL
    import scipy
    print(f"Python {platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__}, "
          f"Pillow {PIL.__version__}, {platform.machine()} {platform.processor() or ''}".rstrip())
    print()
    print("| transform | input (N x CxHxW, float32) | calls | CPU µs / call | CPU µs / image |")
    print("|---|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['transform']} | {row['input']} | {row['reps']} | "
              f"{row['cpu_us_per_call']:,.1f} | {row['cpu_us_per_image']:,.1f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
