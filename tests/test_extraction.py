"""PRADA-style extraction detection: synthetic queries grown from a few seeds are flagged,
natural images drawn at random are not.

Data: the bundled Fashion-MNIST sample (bastion.traffic.load_images: 64 images; predicted classes
from the bundled demo model when onnxruntime can load it), and scikit-learn's bundled digits
(1797 natural images, 8x8 scaled to [0, 1], and the same upsampled to 28x28 so the random
projection 784 -> 64 features is exercised). The Fashion-MNIST sample is too small for the benign
side: 64 distinct images give at most 63 distances, fewer than min_queries (75), so a benign
client drawing from it is never tested (checked below); false positives are measured on digits.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from bastion.detectors.extraction import ExtractionConfig, ExtractionMonitor

MAX_QUERIES_TO_DETECT = 300     # attacks are flagged within this many queries ...
MIN_DETECTED = 8                # ... in at least this many of the 9 runs per dataset (measured:
                                # 9/9 on digits-8x8 and the Fashion-MNIST sample, 8/9 on digits
                                # upsampled to 28x28, where one "mixed" run stays at W >= 0.90)
BENIGN_CLIENTS = 10
BENIGN_QUERIES = 600


def _upsample(images: np.ndarray, size: int = 28) -> np.ndarray:
    """Bilinear upsampling of [N, h, w] images (numpy only)."""
    n, h, w = images.shape
    ys, xs = np.linspace(0, h - 1, size), np.linspace(0, w - 1, size)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = (ys - y0)[None, :, None], (xs - x0)[None, None, :]
    top = images[:, y0][:, :, x0] * (1 - fx) + images[:, y0][:, :, x1] * fx
    bottom = images[:, y1][:, :, x0] * (1 - fx) + images[:, y1][:, :, x1] * fx
    return (top * (1 - fy) + bottom * fy).astype(np.float32)


class Prototypes:
    """Stands in for a model's predicted class: the nearest of 10 random images."""

    def __init__(self, images: np.ndarray, classes: int = 10, seed: int = 0):
        rng = np.random.default_rng(seed)
        flat = images.reshape(len(images), -1)
        self.prototypes = flat[rng.choice(len(flat), classes, replace=False)]

    def __call__(self, image: np.ndarray) -> int:
        diff = self.prototypes - image.reshape(1, -1)
        return int(np.einsum("ij,ij->i", diff, diff).argmin())


class DemoModel:
    """The bundled Fashion-MNIST classifier's predicted class."""

    def __init__(self):
        import onnxruntime
        from bastion.traffic import IMAGE_MODEL, _package_file
        self.session = onnxruntime.InferenceSession(
            str(_package_file("demo_models", IMAGE_MODEL, "model.onnx")),
            providers=["CPUExecutionProvider"])

    def __call__(self, image: np.ndarray) -> int:
        logits = self.session.run(None, {"image": image.reshape(1, 1, 28, 28).astype(np.float32)})[0]
        return int(logits.argmax())


def _datasets() -> dict:
    from sklearn.datasets import load_digits
    digits = (load_digits().images / 16.0).astype(np.float32)
    found = {"digits-8x8": (digits, Prototypes(digits))}
    big = _upsample(digits)
    found["digits-28x28"] = (big, Prototypes(big))
    try:
        from bastion.traffic import load_images
        images = load_images()[0][:, 0].astype(np.float32)
    except (FileNotFoundError, OSError):
        return found
    try:
        model = DemoModel()
    except Exception:  # noqa: BLE001 - no runtime or model: group by prototypes instead
        model = Prototypes(images)
    found["fashion-mnist-sample"] = (images, model)
    return found


DATASETS = _datasets()


def benign_queries(images, rng, n):
    """Natural images drawn at random (with replacement: repeats happen)."""
    return [images[i] for i in rng.integers(0, len(images), n)]


def attack_queries(images, rng, n, kind, seeds=10, step=0.1):
    """Synthetic queries from a few seeds (PRADA's evaluation: Papernot et al.'s Jacobian-based
    augmentation steps, approximated by sign perturbations of earlier queries, and
    interpolations between them)."""
    pool = [images[i] for i in rng.choice(len(images), seeds, replace=False)]
    out = []
    while len(out) < n:
        if kind == "jbda" or (kind == "mixed" and rng.random() < 0.5):
            base = pool[rng.integers(len(pool))]
            query = np.clip(base + step * np.sign(rng.standard_normal(base.shape)), 0, 1)
            query = query.astype(np.float32)
            pool.append(query)
        else:
            a, b = pool[rng.integers(len(pool))], pool[rng.integers(len(pool))]
            t = rng.random()
            query = (t * a + (1 - t) * b).astype(np.float32)
        out.append(query)
    return out


def run_client(monitor, identity, queries, model):
    first, ws = None, []
    for query in queries:
        result = monitor.observe(identity, "fashion-mnist", query, model(query))
        if result.w is not None:
            ws.append(result.w)
        if result.flagged and first is None:
            first = result.queries
    return first, ws


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_attackers_are_flagged(dataset):
    images, model = DATASETS[dataset]
    monitor = ExtractionMonitor(ExtractionConfig())
    detected = {}
    for kind in ("jbda", "mixed", "interpolation"):
        for seed in (1, 2, 3):
            queries = attack_queries(images, np.random.default_rng(seed), MAX_QUERIES_TO_DETECT,
                                     kind)
            first, ws = run_client(monitor, f"attacker-{kind}-{seed}", queries, model)
            detected[f"{kind}/{seed}"] = (first, round(min(ws), 3))
    flagged = sum(first is not None for first, _ in detected.values())
    print(f"\n[{dataset}] {flagged}/{len(detected)} flagged; queries to detection (lowest W): "
          f"{detected}")
    assert flagged >= MIN_DETECTED, detected
    assert all(detected[f"jbda/{seed}"][0] is not None for seed in (1, 2, 3)), detected


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_benign_clients_are_not_flagged(dataset):
    images, model = DATASETS[dataset]
    monitor = ExtractionMonitor(ExtractionConfig())
    false_positives, lowest, tested = 0, [], 0
    for client in range(BENIGN_CLIENTS):
        queries = benign_queries(images, np.random.default_rng(100 + client), BENIGN_QUERIES)
        first, ws = run_client(monitor, f"benign-{client}", queries, model)
        false_positives += first is not None
        tested += bool(ws)
        lowest += ws
    pair = monitor.pairs[(f"benign-{BENIGN_CLIENTS - 1}", "fashion-mnist")]
    print(f"\n[{dataset}] benign: {BENIGN_CLIENTS} clients x {BENIGN_QUERIES} random draws, "
          f"{false_positives} flagged, {tested} reached min_queries, lowest W "
          f"{min(lowest) if lowest else None} (threshold {monitor.config.w_threshold}); last "
          f"client: {len(pair.distances)} distances, {pair.repeats} exact repeats")
    assert false_positives == 0
    if len(images) <= monitor.config.min_queries:
        assert tested == 0          # too few distinct images to say anything (see above)
    else:
        assert tested == BENIGN_CLIENTS


def test_clients_and_models_are_separate():
    images, model = DATASETS["digits-8x8"]
    monitor = ExtractionMonitor()
    rng = np.random.default_rng(5)
    attack = attack_queries(images, rng, 200, "jbda")
    benign = benign_queries(images, rng, 200)
    flags = {"attacker": False, "benign": False}
    for a, b in zip(attack, benign):       # interleaved, one monitor
        flags["attacker"] |= monitor.observe("attacker", "m", a, model(a)).flagged
        flags["benign"] |= monitor.observe("benign", "m", b, model(b)).flagged
    assert flags == {"attacker": True, "benign": False}
    # The attacker's state for another model starts empty.
    assert monitor.observe("attacker", "other", attack[0]).queries == 1


def test_repeats_are_not_measured():
    monitor = ExtractionMonitor()
    image = DATASETS["digits-8x8"][0][0]
    for _ in range(300):
        result = monitor.observe("probe", "m", image)
    assert result.queries == 300 and result.w is None and not result.flagged
    assert monitor.pairs[("probe", "m")].repeats == 299


def test_memory_is_bounded():
    config = ExtractionConfig(max_clients=8, max_queries_per_client=100, window=100,
                              min_queries=50)
    monitor = ExtractionMonitor(config)
    rng = np.random.default_rng(0)
    for client in range(20):
        for query in benign_queries(DATASETS["digits-8x8"][0], rng, 300):
            monitor.observe(f"c{client}", "m", query)
    assert len(monitor.pairs) == 8
    assert list(monitor.pairs)[-1] == ("c19", "m") and ("c0", "m") not in monitor.pairs
    for pair in monitor.pairs.values():
        assert pair.count <= 100 and len(pair.vectors) <= 100 and len(pair.distances) <= 100
    assert monitor.memory_bytes() <= monitor.memory_bound_bytes()
    default = ExtractionMonitor()
    print(f"\nworst-case memory with defaults: {default.memory_bound_bytes() / 2**20:.0f} MiB")


def test_projection_and_input_hygiene():
    monitor = ExtractionMonitor(ExtractionConfig(feature_dim=64))
    big = np.random.default_rng(0).random((1, 1, 28, 28), dtype=np.float32)
    features = monitor.features(big)
    assert features.shape == (64,) and features.dtype == np.float32
    assert np.array_equal(features, ExtractionMonitor(ExtractionConfig(feature_dim=64)).features(big))
    # Distances are roughly preserved (Johnson-Lindenstrauss).
    other = np.random.default_rng(1).random((1, 1, 28, 28), dtype=np.float32)
    ratio = (np.linalg.norm(monitor.features(big) - monitor.features(other))
             / np.linalg.norm(big - other))
    assert 0.6 < ratio < 1.4
    # Non-finite values do not poison the state.
    bad = big.copy()
    bad[0, 0, 0, :3] = [np.nan, np.inf, -np.inf]
    assert np.isfinite(monitor.features(bad)).all()
    assert monitor.features(np.arange(10, dtype=np.float32)).shape == (64,)


def test_observe_cost():
    images = DATASETS["digits-28x28"][0]
    monitor = ExtractionMonitor()
    queries = benign_queries(images, np.random.default_rng(3), 1500)
    for query in queries[:1000]:
        monitor.observe("c", "m", query, 0)
    start = time.perf_counter()
    for query in queries[1000:]:
        monitor.observe("c", "m", query, 0)
    per_call = (time.perf_counter() - start) / 500
    print(f"\nExtractionMonitor.observe with ~1000 stored queries and a 500-distance window: "
          f"{per_call * 1e6:.0f} us/call")
    assert per_call < 5e-3
