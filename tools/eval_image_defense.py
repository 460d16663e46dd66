#!/usr/bin/env python3
"""The image attack suite, end to end through the sidecar; writes docs/quality-image-defense.md
(between its GENERATED markers).

    python3 tools/eval_image_defense.py              # full run (see --help for sizes)
    python3 tools/eval_image_defense.py --smoke --json out.json   # seconds; CI (no doc)

Main number: per attack, the share of adversarial images that were **answered and
misclassified** by a real `bastion serve` (the shipped profile, enforce mode) in front of a real
`bastion upstream`, called by tritonclient with one image per request, next to clean refusals,
clean accuracy and CPU per image. "undefended" is the same client talking to the upstream
directly.

* Images: Fashion-MNIST test images the model classifies correctly, from index 5000 on (the
  profile was fitted on training images only). Clean rows: test images 0.. (all of them, right
  or wrong).
* White-box attacks (IBM ART, on the CNN rebuilt in torch from the shipped ONNX weights; the
  attacker does not know the defense): FGSM L-inf 0.1 (the one attack the profile's combiner was
  fitted on), PGD L-inf 0.03 / 0.05 / 0.1, PGD L2 1.5, Carlini-Wagner L2, DeepFool
  (tools/image_attacks.py). Every adversarial image is sent as uint8 (a stored image).
* Black-box: Square (L-inf 0.1) whose every query goes through the endpoint under test, with a
  query budget (tools/image_blackbox.py).
* Adaptive: PGD L-inf 0.1 on the model loss plus the profile's own detector score, through the
  bit-depth squeeze (BPDA) (tools/image_adaptive.py).
* Detection AUROC per attack: the stage's log-odds on what it sees in enforce mode (profile
  request stages, then the upstream's outputs), clean vs attacked.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

import numpy as np

TOOLS = pathlib.Path(__file__).resolve().parent
REPO = TOOLS.parent
sys.path.insert(0, str(TOOLS))
sys.path.insert(0, str(REPO))

import image_attacks as attacks  # noqa: E402

DOC = REPO / "docs" / "quality-image-defense.md"
COMPARE_DOC = REPO / "docs" / "quality-image-adversarial-training.md"
PROFILE = REPO / "bastion" / "profiles" / "image-classifier.yaml"
# The client tier for a profile that has none (the robust model's): the shipped profile's.
SUSPICION = {"weights": {"anomaly:": 1.0}, "request_credit": 0.1, "throttle_at": 5.0,
             "block_at": 20.0, "half_life_s": 300.0}
TIER = "profile + client tier"
PASS_THROUGH = "models:\n  fashion-mnist: {mode: enforce, pipeline: []}\n"


@dataclasses.dataclass
class Sizes:
    attack_images: int = 100
    clean_images: int = 1000
    cw_steps: int = 30
    deepfool_steps: int = 50
    square_images: int = 50
    square_queries: int = 200
    adaptive_steps: int = 40
    adaptive_lambdas: tuple = (0.0, 1.0, 10.0)


SMOKE = Sizes(attack_images=6, clean_images=12, cw_steps=3, deepfool_steps=5, square_images=3,
              square_queries=3, adaptive_steps=3, adaptive_lambdas=(1.0,))


def suite(sizes: Sizes) -> list:
    """The white-box attacks with the sizes' step counts."""
    out = []
    for attack in attacks.ATTACKS:
        if attack.kind == "cw_l2":
            attack = dataclasses.replace(attack, steps=sizes.cw_steps)
        elif attack.kind == "deepfool":
            attack = dataclasses.replace(attack, steps=sizes.deepfool_steps)
        out.append(attack)
    return out


def auroc(clean: np.ndarray, attacked: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score
    return float(roc_auc_score(np.r_[np.zeros(len(clean)), np.ones(len(attacked))],
                               np.r_[clean, attacked]))


def evaluate_endpoint(name: str, config: str | None, clean, clean_y, adversarial: dict, y,
                      sizes: Sizes, square_x, square_y, log, fresh_client: bool = False,
                      model: str = "fashion-mnist") -> dict:
    """One deployment (config None = the upstream alone): clean run, every attack, Square
    (no attacks when ``adversarial`` is None: clean traffic and cost only)."""
    from image_blackbox import square_through
    from image_e2e import REFUSED, Deployment, Endpoint
    deployment = Deployment(config)
    endpoint = Endpoint(deployment.address, model=model)
    try:
        row = {"attacks": {}}
        if len(clean):
            endpoint.classify(clean[:8])  # warm-up (first calls load sessions, open channels)
            cpu0, t0 = deployment.cpu(), time.perf_counter()
            predicted = endpoint.classify(clean)
            cpu = (deployment.cpu() - cpu0) / len(clean)
            wall = (time.perf_counter() - t0) / len(clean)
            answered = predicted != REFUSED
            row.update({
                "clean_refused": float(np.mean(~answered)),
                "clean_accuracy_answered": float(np.mean(predicted[answered] == clean_y[answered]))
                if answered.any() else 0.0,
                "clean_accuracy_all": float(np.mean(predicted == clean_y)),
                "cpu_ms_per_image": 1000 * cpu, "wall_ms_per_image": 1000 * wall})
            log(f"[{name}] clean: refused {row['clean_refused']:.3f}, accuracy (answered) "
                f"{row['clean_accuracy_answered']:.4f}, CPU {row['cpu_ms_per_image']:.2f} ms/image")
        if adversarial is None:
            return row
        for attack_name, images in adversarial.items():
            labels = y[:len(images)]
            predicted = endpoint.classify(images)
            row["attacks"][attack_name] = _attack_row(predicted, labels, REFUSED)
            log(f"[{name}] {attack_name}: {row['attacks'][attack_name]}")
        started, queries = time.perf_counter(), endpoint.queries
        square = attacks.quantize(square_through(endpoint, square_x, square_y, eps=0.1,
                                                 max_iter=sizes.square_queries))
        spent = endpoint.queries - queries
        if fresh_client:
            # the attacker's finished images, sent as a new client would (its tier reset)
            endpoint.close()
            deployment.stop()
            deployment = Deployment(config)
            endpoint = Endpoint(deployment.address, model=model)
        predicted = endpoint.classify(square)
        row["attacks"]["Square Linf 0.1 (black-box)"] = {
            **_attack_row(predicted, square_y, REFUSED),
            "queries_per_image": spent / len(square_x),
            "seconds": time.perf_counter() - started}
        log(f"[{name}] Square: {row['attacks']['Square Linf 0.1 (black-box)']}")
    finally:
        endpoint.close()
        deployment.stop()
    return row


def _attack_row(predicted: np.ndarray, labels: np.ndarray, refused: int) -> dict:
    answered = predicted != refused
    return {"success": float(np.mean(answered & (predicted != labels))),
            "refused": float(np.mean(~answered)), "n": int(len(labels))}


def detection_table(view, adversarial: dict, clean: np.ndarray) -> dict:
    """Per attack: AUROC of each stage's score and the share the profile flags (any stage at
    its threshold), against clean test images (offline: the profile's request stages, then
    `bastion upstream`'s outputs; the same scores the sidecar computes)."""
    from image_e2e import Upstream
    thresholds = view.thresholds()
    upstream = Upstream()
    try:
        def flagged(scores: dict) -> np.ndarray:
            return np.any([scores[s] >= t for s, t in thresholds.items()], axis=0)
        clean_scores = view.scores(view.answers(upstream.address, clean))
        out = {"_clean": {"flagged": float(np.mean(flagged(clean_scores)))}}
        for name, images in adversarial.items():
            scores = view.scores(view.answers(upstream.address, images))
            out[name] = {"flagged": float(np.mean(flagged(scores))),
                         **{f"auroc:{s}": auroc(clean_scores[s], scores[s]) for s in thresholds}}
    finally:
        upstream.stop()
    return out


def run(args) -> dict:
    import onnxruntime as ort
    import torch

    from fit_image_ensemble import ProfileView
    from image_adaptive import adaptive_pgd
    from tests.harness import fashion_mnist

    sizes = SMOKE if args.smoke else Sizes(attack_images=args.attack_images,
                                           clean_images=args.clean_images,
                                           square_images=args.square_images,
                                           square_queries=args.square_queries)
    torch.set_num_threads(args.threads)
    log = lambda message: print(message, flush=True)  # noqa: E731
    started = time.time()
    x, y = fashion_mnist("t10k")
    onnx = attacks.onnx_path(args.model)
    sess = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    candidates = np.arange(args.attack_from, len(x))
    right = sess.run(["logits"], {"image": x[candidates]})[0].argmax(1) == y[candidates]
    chosen = candidates[right][:sizes.attack_images]
    xs, ys = x[chosen], y[chosen]
    clean, clean_y = x[:sizes.clean_images], y[:sizes.clean_images]

    net = attacks.torch_model(onnx)
    classifier = attacks.art_classifier(net)
    adversarial = {}
    for attack in suite(sizes):
        t0 = time.time()
        cached = _cache_path(args.cache, attack, chosen, args.seed, args.model)
        if cached is not None and cached.exists():
            adversarial[attack.name] = np.load(cached)["adv"]
            continue
        adversarial[attack.name] = attacks.quantize(
            attacks.run_attack(attack, classifier, xs, ys, seed=args.seed))
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(cached, adv=adversarial[attack.name], idx=chosen)
        log(f"{attack.name}: {time.time() - t0:.1f}s")

    view = ProfileView(args.profile, args.model)
    thresholds = view.thresholds()
    t0 = time.time()
    adaptive_name = "Adaptive PGD Linf 0.1 (model + detectors)"
    # cached under the detectors' thresholds and the lambdas too: a refit makes a new attack
    tag = "-".join(f"{t:.6g}" for t in thresholds.values()) + f"-{sizes.adaptive_lambdas}"
    cached = _cache_path(args.cache, attacks.Attack(f"adaptive {tag}", "adaptive", 0.1,
                                                    sizes.adaptive_steps), chosen, args.seed,
                         args.model)
    if cached is not None and cached.exists():
        adversarial[adaptive_name] = np.load(cached)["adv"]
    else:
        adversarial[adaptive_name] = adaptive_pgd(
            net, [(stage.model, thresholds[runner.config.stage_id])
                  for runner, stage in view.stages],
            xs, ys, eps=0.1, steps=sizes.adaptive_steps, bits=_bit_depth(view),
            lambdas=sizes.adaptive_lambdas, seed=args.seed)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(cached, adv=adversarial[adaptive_name], idx=chosen)
    log(f"adaptive: {time.time() - t0:.1f}s")

    detection = detection_table(view, adversarial, clean)
    detectors_text, tier_text, tier = split_profile(args.profile.read_text())
    square_x, square_y = xs[:sizes.square_images], ys[:sizes.square_images]
    endpoints = {}
    # Each attacked image is judged by the detectors alone ("profile"): one client sending
    # attack after attack would also be throttled by the tier, which says nothing per image.
    for name, config in (("undefended", None), ("profile", detectors_text)):
        endpoints[name] = evaluate_endpoint(name, config, clean, clean_y, adversarial, ys, sizes,
                                            square_x, square_y, log, model=args.model)
    if args.suspicion:
        # The profile with its client tier (as shipped): clean traffic from one client (is it
        # ever escalated?), then the black-box attacker, whose refusals raise its score.
        endpoints[TIER] = evaluate_endpoint(
            TIER, tier_text, clean, clean_y, {}, ys, sizes, square_x, square_y, log,
            fresh_client=True, model=args.model)
    # The sidecar with no stages for the model: what the proxy itself costs, defenses aside.
    endpoints["sidecar, no stages"] = evaluate_endpoint(
        "sidecar, no stages", PASS_THROUGH.replace("fashion-mnist", args.model), clean, clean_y,
        None, ys, sizes, None, None, log, model=args.model)
    return {"sizes": dataclasses.asdict(sizes), "thresholds": thresholds, "tier": tier,
            "fit_attack": attacks.FIT_ATTACK, "detection": detection, "endpoints": endpoints,
            "attack_from": int(args.attack_from),
            "seconds": time.time() - started, "model": args.model, "profile": str(args.profile.relative_to(REPO))
            if args.profile.is_relative_to(REPO) else str(args.profile)}


def split_profile(text: str) -> tuple[str, str, dict]:
    """(the profile's detectors alone, the profile with its client tier, that tier's
    suspicion settings); a profile without a ``clients`` section gets SUSPICION."""
    import yaml
    config = yaml.safe_load(text)
    detectors = {k: v for k, v in config.items() if k != "clients"}
    tiered = dict(config, clients=config.get("clients") or {"suspicion": SUSPICION})
    return (yaml.safe_dump(detectors), yaml.safe_dump(tiered),
            tiered["clients"].get("suspicion", {}))


def _cache_path(folder, attack, chosen: np.ndarray, seed: int, model: str = "fashion-mnist"):
    """Where a computed attack is kept between runs (None: no cache); the name pins the
    attack's parameters, the images (a hash of their indices) and the seed."""
    if folder is None:
        return None
    import hashlib
    images = hashlib.sha256(chosen.astype(np.int64).tobytes()).hexdigest()[:12]
    slug = "".join(c if c.isalnum() or c == "." else "_" for c in attack.name)
    if model != "fashion-mnist":  # the demo model's names stay as they were
        slug = f"{model}-{slug}"
    return folder / f"{slug}-{attack.kind}-{attack.eps}-{attack.steps}-{images}-{seed}.npz"


def _bit_depth(view) -> int:
    for runner in view.pipeline.runners:
        if runner.config.kind_name == "transform.bit_depth":
            return int(runner.config.impl.bits)
    return 8


def render(result: dict, command: str) -> str:
    und, prof = result["endpoints"]["undefended"], result["endpoints"]["profile"]
    stages = list(result["thresholds"])
    lines = [f"Command: `{command}` ({result['seconds'] / 60:.1f} min). Profile: "
             f"`{result['profile']}`; thresholds "
             + ", ".join(f"`{s}` {t:.4f}" for s, t in result["thresholds"].items()) + ".", ""]
    lines += ["### End to end: share of attacked images answered and misclassified", "",
              f"{result['sizes']['attack_images']} test images the model gets right, from "
              f"index {result.get('attack_from', 5000)} on (Square: "
              f"the first {result['sizes']['square_images']}, "
              f"{result['sizes']['square_queries']} iterations). `refused` = the sidecar "
              "refused the request. AUROC = each stage's score, clean test images vs attacked "
              "(offline, same code and tensors); `flagged` = share above any threshold.", "",
              "| attack | fitted on? | undefended | **profile** | refused (profile) | "
              + " | ".join(f"AUROC `{s}`" for s in stages) + " | flagged |",
              "|---|---|---:|---:|---:|" + "---:|" * len(stages) + "---:|"]
    for name, row in prof["attacks"].items():
        detect = result["detection"].get(name, {})
        fitted = "yes" if name == result["fit_attack"] else "no"
        aurocs = " | ".join(f"{detect[f'auroc:{s}']:.4f}" if f"auroc:{s}" in detect else "-"
                            for s in stages)
        flagged = f"{detect['flagged']:.1%}" if "flagged" in detect else "-"
        lines.append(f"| {name} | {fitted} | {und['attacks'][name]['success']:.1%} | "
                     f"**{row['success']:.1%}** | {row['refused']:.1%} | {aurocs} | {flagged} |")
    tiered = result["endpoints"].get(TIER) or result["endpoints"].get(
        "profile + suspicion tier")  # older saved numbers
    if tiered:
        square = tiered["attacks"]["Square Linf 0.1 (black-box)"]
        setting = json.dumps(result.get("tier") or {})
        lines += ["", "The white-box rows judge each image by the detectors alone. Square "
                  f"against the profile with its client tier (`clients.suspicion: {setting}`"
                  f", one attacking client; its finished images then sent by a new client): "
                  f"**{square['success']:.1%}** answered and misclassified, "
                  f"{square['refused']:.1%} refused, {square['queries_per_image']:.0f} queries "
                  "per image (refused ones included)."]
    lines += ["", "### Clean traffic and cost", "",
              f"{result['sizes']['clean_images']} test images 0.., one per request.", "",
              "| endpoint | refused | accuracy (answered) | accuracy (refusal = wrong) | "
              "CPU ms / image (upstream + sidecar) | wall ms / image |",
              "|---|---:|---:|---:|---:|---:|"]
    for name, row in result["endpoints"].items():
        if "clean_refused" not in row:
            continue
        lines.append(f"| {name} | {row['clean_refused']:.1%} | "
                     f"{row['clean_accuracy_answered']:.4f} | {row['clean_accuracy_all']:.4f} | "
                     f"{row['cpu_ms_per_image']:.2f} | {row['wall_ms_per_image']:.2f} |")
    lines += ["", "CPU cost of the profile: "
              f"{cpu_ratio(prof, und)} the undefended upstream's per image"]
    bare = result["endpoints"].get("sidecar, no stages")
    if bare:
        lines[-1] += (f"; {cpu_ratio(prof, bare)} the "
                      "sidecar's with no stages (the proxy's own cost set aside).")
    else:
        lines[-1] += "."
    return "\n".join(lines)


def cpu_ratio(row: dict, baseline: dict) -> str:
    """"1.46x", or "n/a" when the baseline's CPU was below the clock's resolution (a smoke run
    of a few images can measure 0 ticks)."""
    if baseline["cpu_ms_per_image"] <= 0:
        return "n/a (baseline below the CPU clock's resolution)"
    return f"{row['cpu_ms_per_image'] / baseline['cpu_ms_per_image']:.2f}x"


def render_comparison(base: dict, robust: dict) -> str:
    """Undefended / profile / adversarially trained / both, from two runs' --json numbers (the
    demo model with the shipped profile; the robust model with the profile fitted for it).
    Each white-box attack is computed against the model it is sent to."""
    columns = [("undefended", base, "undefended"), ("profile", base, "profile"),
               ("adv-trained", robust, "undefended"), ("adv-trained + profile", robust, "profile")]
    lines = [f"Commands: `{base['command']}` and `{robust['command']}`.", "",
             "Share of attacked images answered **and** misclassified, end to end (white-box "
             "attacks computed against the model being served, on "
             f"{base['sizes']['attack_images']} test images that model gets right; Square "
             f"through the endpoint, {base['sizes']['square_images']} images).", "",
             "| attack | " + " | ".join(name for name, _, _ in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for attack in base["endpoints"]["profile"]["attacks"]:
        cells = []
        for _, run, endpoint in columns:
            row = run["endpoints"][endpoint]["attacks"].get(attack)
            cells.append(f"{row['success']:.1%}" if row else "-")
        lines.append(f"| {attack} | " + " | ".join(cells) + " |")
    for label, key, fmt in (("clean refused", "clean_refused", "{:.1%}"),
                            ("clean accuracy (answered)", "clean_accuracy_answered", "{:.4f}"),
                            ("clean accuracy (refusal = wrong)", "clean_accuracy_all", "{:.4f}"),
                            ("CPU ms / image", "cpu_ms_per_image", "{:.2f}")):
        lines.append(f"| *{label}* | " + " | ".join(
            fmt.format(run["endpoints"][endpoint][key]) for _, run, endpoint in columns) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CI); writes no doc")
    ap.add_argument("--profile", type=pathlib.Path, default=PROFILE)
    ap.add_argument("--model", default="fashion-mnist",
                    help="the served model attacked (and the profile's model entry)")
    ap.add_argument("--attack-images", type=int, default=Sizes.attack_images)
    ap.add_argument("--clean-images", type=int, default=Sizes.clean_images)
    ap.add_argument("--square-images", type=int, default=Sizes.square_images)
    ap.add_argument("--square-queries", type=int, default=Sizes.square_queries)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--suspicion", action="store_true",
                    help="also run clean traffic and Square against the profile with its client "
                         "tier (the profile's clients section, else SUSPICION)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--attack-from", type=int, default=5000,
                    help="attack the test images the model gets right from this index on "
                         "(another index gives an independent set of attacked images)")
    ap.add_argument("--json", type=pathlib.Path, help="also write the numbers here")
    ap.add_argument("--cache", type=pathlib.Path,
                    help="keep computed white-box attacks here and reuse them")
    ap.add_argument("--doc", type=pathlib.Path, default=None,
                    help=f"doc to write (default {DOC.relative_to(REPO)}; none with --smoke)")
    ap.add_argument("--from-json", type=pathlib.Path,
                    help="no run: render the doc from the numbers an earlier --json wrote")
    ap.add_argument("--compare", type=pathlib.Path, nargs=2, metavar=("BASE", "ROBUST"),
                    help="no run: write the adversarial-training comparison from two --json "
                         f"files to {COMPARE_DOC.relative_to(REPO)}")
    args = ap.parse_args(argv)
    if args.compare:
        from generated_doc import write_generated
        base, robust = (json.loads(path.read_text()) for path in args.compare)
        write_generated(COMPARE_DOC, render_comparison(base, robust),
                        "Quality: the image profile next to adversarial training")
        return 0
    if args.from_json:
        result = json.loads(args.from_json.read_text())
        command = result["command"]
    else:
        result = run(args)
        command = "python3 tools/eval_image_defense.py " + " ".join(
            argv if argv is not None else sys.argv[1:])
        result["command"] = command.strip()
    if args.json and not args.from_json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    doc = args.doc or (None if args.smoke else DOC)
    if doc is not None:
        from generated_doc import write_generated
        write_generated(doc, render(result, command.strip()),
                        "Quality: the image profile against an attack suite")
    else:
        print(render(result, command.strip()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
