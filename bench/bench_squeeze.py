"""What the response stages (`detect.squeeze`, `smooth.randomized`, `detect.features`) cost,
through a running sidecar, as a Markdown table of ratios to a plain call measured in the same run.

Starts `bastion upstream` (the Fashion-MNIST demo CNN, served under one name per target) and
`bastion serve` in front of it, then sends one Fashion-MNIST test image per call, one call at a
time, to each target in turn for ``--rounds`` rounds (interleaved, so load from elsewhere on the
machine hits every target alike). Per target: median latency, and CPU seconds per client call of
the upstream process and of the sidecar process (utime + stime from /proc/<pid>/stat around each
window). Ratios are to ``plain`` (the same sidecar, a model with no pipeline: one forwarded call),
so they show what the defense adds; ``direct`` (no sidecar) is there for scale.

    python bench/bench_squeeze.py [--rounds 5] [--calls 100] [--smooth-calls 10] [--json OUT]
                                  [--targets plain features-knn ...]

The ``detect.features`` targets score ``conv1_stats`` with states fitted here (onnxruntime on the
first ``--reference`` Fashion-MNIST training images from Debian's dataset-fashion-mnist).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

import grpc
import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bastion import traffic  # noqa: E402
from tests.harness import Sidecar, Upstream, fashion_mnist  # noqa: E402

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
CNN = REPO / "bastion" / "demo_models" / "fashion-mnist" / "model.onnx"
# target -> (pipeline YAML or None for no stage, what it does, upstream calls per client call)
TARGETS = {
    "plain": (None, "no stage (baseline)", 1),
    "squeeze-2": ('[{detect.squeeze: {squeezers: ["bit_depth:1", "median:2"]}}]',
                  "detect.squeeze, 2 squeezers, batched", 1),
    "squeeze-3": ("[{detect.squeeze: {}}]", "detect.squeeze, 3 squeezers (default), batched", 1),
    "squeeze-2-unbatched": ('[{detect.squeeze: {squeezers: ["bit_depth:1", "median:2"], '
                            'batched: false}}]', "detect.squeeze, 2 squeezers, unbatched", 3),
    "smooth-100": ("[{smooth.randomized: {sigma: 0.25, n0: 100, n: 100, abstain: flag}}]",
                   "smooth.randomized n0=100 n=100", 1 + 1),
    "smooth-1000": ("[{smooth.randomized: {sigma: 0.25, n0: 100, n: 1000, abstain: flag}}]",
                    "smooth.randomized n0=100 n=1000", 1 + 5),
    "features-maha": ("[{detect.features: {output: conv1_stats, state: '{tmp}/maha.npz'}}]",
                      "detect.features, conv1_stats, class-conditional Mahalanobis", 1),
    "features-knn": ("[{detect.features: {output: conv1_stats, method: knn, "
                     "state: '{tmp}/knn.npz'}}]",
                     "detect.features, conv1_stats, kNN k=10", 1),
    # The shipped image profile's pipeline (bastion/profiles/image-classifier.yaml), and the
    # same without its logit-gap stage (the profile before that stage was added).
    "image-profile": ("profile", "shipped image-classifier profile (3 response stages)", 1),
    "image-profile-no-gaps": ("profile-no-gaps", "the same without the `gaps` stage", 1),
}
IMAGE_PROFILE = REPO / "bastion" / "profiles" / "image-classifier.yaml"


def profile_entry(without: tuple[str, ...] = ()) -> dict:
    """The image profile's model entry (inputs, pipeline), minus the stages with ids in
    ``without``."""
    import yaml
    entry = yaml.safe_load(IMAGE_PROFILE.read_text())["models"]["fashion-mnist"]
    pipeline = [stage for stage in entry["pipeline"]
                if not any(isinstance(opts, dict) and opts.get("id") in without
                           for opts in stage.values())]
    return {"inputs": entry["inputs"], "pipeline": pipeline}


def cpu_seconds(pid: int) -> float:
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def config(targets: list[str], tmp: str) -> str:
    lines = ["models:"]
    for name in targets:
        pipeline = TARGETS[name][0]
        lines.append(f"  {name}:")
        lines.append("    mode: enforce")
        if pipeline in ("profile", "profile-no-gaps"):
            entry = profile_entry(("gaps",) if pipeline == "profile-no-gaps" else ())
            lines.append(f"    inputs: {json.dumps(entry['inputs'])}")
            lines.append(f"    pipeline: {json.dumps(entry['pipeline'])}")
        elif pipeline:
            lines.append(f"    pipeline: {pipeline.replace('{tmp}', tmp)}")
    return "\n".join(lines) + "\n"


def fit_feature_states(tmp: pathlib.Path, count: int) -> None:
    """States for the detect.features targets, from the model's conv1_stats on training images."""
    import onnxruntime

    from bastion.detectors.anomaly import save_state
    from bastion.detectors.anomaly_models import make_model
    images, labels = fashion_mnist("train", count)
    session = onnxruntime.InferenceSession(str(CNN), providers=["CPUExecutionProvider"])
    stats = session.run(["conv1_stats"], {"image": images})[0]
    source = "upstream:bench:conv1_stats"
    save_state(tmp / "maha.npz", make_model("mahalanobis").fit(stats, labels), source)
    save_state(tmp / "knn.npz", make_model("knn", k=10).fit(stats), source)


def window(call, payload: bytes, calls: int, upstream_pid: int, sidecar_pid: int | None):
    latencies = []
    up0 = cpu_seconds(upstream_pid)
    side0 = cpu_seconds(sidecar_pid) if sidecar_pid else 0.0
    for _ in range(calls):
        start = time.perf_counter()
        call(payload, timeout=60)
        latencies.append(time.perf_counter() - start)
    up1 = cpu_seconds(upstream_pid)
    side1 = cpu_seconds(sidecar_pid) if sidecar_pid else 0.0
    return {"p50_ms": statistics.median(latencies) * 1e3,
            "mean_ms": statistics.fmean(latencies) * 1e3,
            "upstream_cpu_ms": (up1 - up0) / calls * 1e3,
            "sidecar_cpu_ms": (side1 - side0) / calls * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=100, help="calls per window (squeeze, plain)")
    parser.add_argument("--smooth-calls", type=int, default=10, help="calls per smoothing window")
    parser.add_argument("--json", type=pathlib.Path)
    parser.add_argument("--targets", nargs="+", choices=list(TARGETS), default=list(TARGETS),
                        help="targets to measure (plain, the baseline, is always included)")
    parser.add_argument("--reference", type=int, default=20000,
                        help="training images the detect.features states are fitted on")
    args = parser.parse_args()
    targets = ["plain"] + [t for t in args.targets if t != "plain"]

    images, _ = traffic.load_images()
    with tempfile.TemporaryDirectory() as tmp:
        if any(t.startswith("features") for t in targets):
            fit_feature_states(pathlib.Path(tmp), args.reference)
        models = pathlib.Path(tmp) / "models"
        for name in targets:
            (models / name).mkdir(parents=True)
            (models / name / "model.onnx").symlink_to(CNN)
        upstream = Upstream(models=str(models))
        sidecar = None
        try:
            sidecar = Sidecar(upstream.address, config=config(targets, tmp))
            results: dict[str, list[dict]] = {name: [] for name in ["direct", *targets]}
            with grpc.insecure_channel(sidecar.address) as via, \
                    grpc.insecure_channel(upstream.address) as direct:
                for name in results:
                    model = "plain" if name == "direct" else name
                    payload = _request(images[0], model)
                    channel = direct if name == "direct" else via
                    for _ in range(3):  # warm-up: connections, sessions, caches
                        channel.unary_unary(MODEL_INFER)(payload, timeout=60)
                for round_ in range(args.rounds):
                    for name in results:
                        model = "plain" if name == "direct" else name
                        channel = direct if name == "direct" else via
                        calls = args.smooth_calls if name.startswith("smooth") else args.calls
                        results[name].append(window(
                            channel.unary_unary(MODEL_INFER), _request(images[round_ % 64], model),
                            calls, upstream.proc.pid,
                            None if name == "direct" else sidecar.proc.pid))
                    print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        finally:
            if sidecar is not None:
                sidecar.stop()
            upstream.stop()

    summary = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
               for name, runs in results.items()}
    base = summary["plain"]
    print(f"\nbench/bench_squeeze.py: {args.rounds} rounds x {args.calls} calls "
          f"({args.smooth_calls} for smoothing), one at a time, one 1x1x28x28 FP32 image per call; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; medians over "
          "rounds.\n")
    print("| target | what | upstream calls per call | extra items per call | latency p50 (ms) | "
          "latency vs plain | upstream CPU per call (ms) | upstream CPU vs plain | "
          "sidecar CPU per call (ms) | sidecar CPU vs plain |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    extras = {"plain": 0, "squeeze-2": 2, "squeeze-3": 3, "squeeze-2-unbatched": 2,
              "smooth-100": 200, "smooth-1000": 1100}
    for name, row in summary.items():
        what = "no sidecar" if name == "direct" else TARGETS[name][1]
        calls = 1 if name == "direct" else TARGETS[name][2]
        side = ("-" if name == "direct" else f"{row['sidecar_cpu_ms']:.2f}")
        side_ratio = ("-" if name == "direct"
                      else f"{row['sidecar_cpu_ms'] / base['sidecar_cpu_ms']:.2f}x")
        print(f"| {name} | {what} | {calls} | {extras.get(name, 0)} | {row['p50_ms']:.2f} | "
              f"{row['p50_ms'] / base['p50_ms']:.2f}x | {row['upstream_cpu_ms']:.2f} | "
              f"{row['upstream_cpu_ms'] / base['upstream_cpu_ms']:.2f}x | {side} | {side_ratio} |")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "runs": results}, indent=2))


def _request(image: np.ndarray, model: str) -> bytes:
    message = traffic.image_request(image, "bench")
    message.model_name = model
    return message.SerializeToString()


if __name__ == "__main__":
    main()
