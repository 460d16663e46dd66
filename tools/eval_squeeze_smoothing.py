#!/usr/bin/env python3
"""Measure `detect.squeeze` and `smooth.randomized` on Fashion-MNIST; write the tables into
docs/quality-squeeze-smoothing.md (between its GENERATED markers).

Run from the repository root (torch is needed for the attacks and the noise training only):

    pip install torch==2.13.0          # local CPU wheel; no other torch spec
    python3 tools/eval_squeeze_smoothing.py            # about 10 min on 1 core; --help for sizes

What it does

* Rebuilds the demo CNN in torch (``build_model`` of tools/training/train_fashion_mnist.py) and
  loads the ONNX file's initializers into it; checks the two agree on the test images.
* Feature squeezing: scores are computed with the stage's own code
  (:meth:`FeatureSqueezer.variants` and :func:`squeeze_distances`, model answers from
  onnxruntime on the shipped ONNX file). The threshold of each squeezer configuration is set for
  a 5 % false-positive rate on ``--calibration`` clean test images (images 0..); attacks (FGSM,
  and BIM = iterated FGSM, 20 steps of 2.5 eps / 20, projected on the L-inf ball and [0, 1]) are
  run on the next ``--attack`` test images, white-box on the model but not adaptive to the
  squeezers (as in Xu et al.). Detection rate is over successful adversarial examples (the model
  was right on the clean image and is wrong on the attacked one).
* Randomized smoothing: the stage itself (``prepare`` + ``on_response``) with an in-process
  onnxruntime upstream, on ``--smooth`` test images spread over the test set, for each sigma,
  with the shipped model and with a copy fine-tuned on Gaussian noise (Cohen et al. train the
  base classifier with the noise it will be smoothed with; ``--finetune-epochs 0`` skips it).
  Certified accuracy at r = the share of images whose smoothed class is the label and whose
  certified radius is >= r.
"""
from __future__ import annotations

import argparse
import asyncio
import pathlib
import sys
import tempfile
import time
import warnings

import numpy as np

from bastion.options import add_options

from generated_doc import write_generated  # tools/ (this script's folder)
from image_attacks import training_module
from linf_attack import linf_attack

REPO = pathlib.Path(__file__).resolve().parent.parent
ONNX_PATH = REPO / "bastion" / "demo_models" / "fashion-mnist" / "model.onnx"
DOC = REPO / "docs" / "quality-squeeze-smoothing.md"

SQUEEZER_CONFIGS = [
    ("bit_depth:1",),
    ("bit_depth:2",),
    ("bit_depth:3",),
    ("bit_depth:4",),
    ("bit_depth:5",),
    ("median:2",),
    ("median:3",),
    ("jpeg:75",),
    ("jpeg:50",),
    ("bit_depth:1", "median:2"),                 # Xu et al.'s MNIST joint detector
    ("bit_depth:1", "median:2", "jpeg:75"),      # the stage's default
    ("bit_depth:4", "median:2"),
    ("bit_depth:5", "median:2", "jpeg:75"),
]
EPSILONS = (0.05, 0.1, 0.2, 0.3)
RADII = (0.0, 0.25, 0.5, 1.0)


def session(path):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_logits(sess, images: np.ndarray, batch: int = 1000) -> np.ndarray:
    return np.concatenate([sess.run(["logits"], {"image": images[i:i + batch]})[0]
                           for i in range(0, len(images), batch)])


def torch_model_from_onnx(train, path=ONNX_PATH):
    return train.load_onnx_weights(train.build_model(), pathlib.Path(path)).eval()


def torch_logits(model, images: np.ndarray) -> np.ndarray:
    import torch
    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(images[i:i + 1000]))[0].numpy()
                               for i in range(0, len(images), 1000)])


# ------------------------------------------------------------------------------------------
# Attacks


def fgsm(model, x: np.ndarray, y: np.ndarray, eps: float) -> np.ndarray:
    return linf_attack(model, x, y, eps, steps=1)


def bim(model, x: np.ndarray, y: np.ndarray, eps: float, steps: int = 20) -> np.ndarray:
    return linf_attack(model, x, y, eps, steps)


# ------------------------------------------------------------------------------------------
# Feature squeezing


def squeezer_distances(sess, images: np.ndarray, specs: list[str],
                       labels: dict | None = None) -> dict[str, np.ndarray]:
    """{squeezer: L1 distance per image}, with the stage's own code; the class the model gives
    each squeezed image goes to ``labels`` if given."""
    from bastion.detectors.squeeze import FeatureSqueezer, SqueezeOptions, squeeze_distances
    stage = FeatureSqueezer(SqueezeOptions(squeezers=tuple(specs)))
    original = run_logits(sess, images)
    variants = [run_logits(sess, v) for v in stage.variants(images, "eval")]
    if labels is not None:
        labels.update({spec: v.argmax(1) for spec, v in zip(specs, variants)})
    distances = squeeze_distances(original, variants, apply_softmax=True)  # [V, N]
    return dict(zip(specs, distances))


def _per_image(function):
    return lambda images: np.stack([function(image[0])[None] for image in images])


def _gaussian_noise(sigma: float):
    def add(images):
        noise = np.random.default_rng(1).standard_normal(images.shape, dtype=np.float32)
        return np.clip(images + sigma * noise, 0, 1)
    return add


def other_filters() -> dict:
    """Denoisers the stage does not offer, scored like a squeezer (L1 between softmaxes): do
    the misses come from the choice of squeezer? (scipy.ndimage, per 28x28 image)"""
    from scipy import ndimage
    return {
        "gaussian blur, sigma 0.5": _per_image(lambda im: ndimage.gaussian_filter(im, 0.5)),
        "gaussian blur, sigma 1": _per_image(lambda im: ndimage.gaussian_filter(im, 1.0)),
        "mean filter 3x3": _per_image(lambda im: ndimage.uniform_filter(im, 3)),
        "grey opening 2x2": _per_image(lambda im: ndimage.grey_opening(im, size=(2, 2))),
        "grey opening 3x3": _per_image(lambda im: ndimage.grey_opening(im, size=(3, 3))),
        "grey closing 2x2": _per_image(lambda im: ndimage.grey_closing(im, size=(2, 2))),
        "median 2 then bit depth 3": lambda images: np.round(7 * np.stack(
            [ndimage.median_filter(im[0], size=2)[None] for im in images])) / 7,
        "gaussian noise, sigma 0.1": _gaussian_noise(0.1),
        "gaussian noise, sigma 0.2": _gaussian_noise(0.2),
    }


def filter_distances(sess, images: np.ndarray, filters: dict) -> dict[str, np.ndarray]:
    from bastion.detectors.squeeze import squeeze_distances
    original = run_logits(sess, images)
    variants = [run_logits(sess, f(images).astype(np.float32)) for f in filters.values()]
    return dict(zip(filters, squeeze_distances(original, variants, apply_softmax=True)))


def evaluate_squeezing(args, train, model, sess, x_test, y_test) -> tuple[list[str], dict]:
    specs = sorted({s for config in SQUEEZER_CONFIGS for s in config})
    calib = x_test[:args.calibration]
    held = slice(args.calibration, args.calibration + args.attack)
    x_att, y_att = x_test[held], y_test[held]
    print(f"squeezing: {len(specs)} squeezers, {len(calib)} calibration images, "
          f"{len(x_att)} attacked images", flush=True)
    squeezed_clean: dict = {}
    clean_cal = squeezer_distances(sess, calib, specs, squeezed_clean)
    clean_held = squeezer_distances(sess, x_att, specs)
    clean_right = run_logits(sess, x_att).argmax(1) == y_att
    others = other_filters()
    others_cal = filter_distances(sess, calib, others)
    others_held = filter_distances(sess, x_att, others)
    others_attacked = {}

    def joint(distances, config):
        return np.max([distances[s] for s in config], axis=0)

    thresholds = {}
    for config in SQUEEZER_CONFIGS:
        scores = np.sort(joint(clean_cal, config))
        # Flag when score > t, with at most 5 % of the calibration images above t.
        thresholds[config] = float(scores[int(np.ceil(0.95 * len(scores))) - 1])
    attacks, kept = {}, {}
    for name, attack in (("FGSM", fgsm), ("BIM", bim)):
        for eps in EPSILONS:
            t0 = time.time()
            adv = attack(model, x_att, y_att, eps)
            predicted = run_logits(sess, adv).argmax(1)
            successful = clean_right & (predicted != y_att)
            squeezed: dict = {}
            distances = squeezer_distances(sess, adv, specs, squeezed)
            attacks[(name, eps)] = (successful, distances)
            others_attacked[(name, eps)] = filter_distances(sess, adv, others)
            kept[(name, eps)] = {spec: float((squeezed[spec] == predicted)[successful].mean())
                                 for spec in specs}
            print(f"  {name} eps={eps}: {successful.sum()} successful of {clean_right.sum()} "
                  f"[{time.time() - t0:.0f}s]", flush=True)

    lines = []
    header = ["squeezers", "threshold (L1)", "FPR held-out"] + \
        [f"{n} {e}" for n in ("FGSM", "BIM") for e in EPSILONS]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    lines.append("| *attack success rate* | | | " + " | ".join(
        f"{attacks[(n, e)][0].sum() / max(1, clean_right.sum()):.3f}"
        for n in ("FGSM", "BIM") for e in EPSILONS) + " |")
    best = {}
    for config in SQUEEZER_CONFIGS:
        t = thresholds[config]
        fpr = float((joint(clean_held, config) > t).mean())
        cells = []
        for key in [(n, e) for n in ("FGSM", "BIM") for e in EPSILONS]:
            successful, distances = attacks[key]
            detected = joint(distances, config)[successful] > t
            rate = detected.mean() if successful.any() else float("nan")
            best[key] = max(best.get(key, 0.0), rate)
            cells.append(f"{rate:.3f}")
        name = ", ".join(config) + (" (default)" if config == SQUEEZER_CONFIGS[10] else "")
        lines.append(f"| {name} | {t:.4f} | {fpr:.3f} | " + " | ".join(cells) + " |")
    keys = [(n, e) for n in ("FGSM", "BIM") for e in EPSILONS]
    lines += ["", "Other denoisers, not offered by the stage, scored the same way (is it the "
              "choice of squeezer?):", "", "| filter | threshold (L1) | FPR held-out | " +
              " | ".join(f"{n} {e}" for n, e in keys) + " |", "|---|---|---|" + "---|" * len(keys)]
    for name in others:
        t = float(np.sort(others_cal[name])[int(np.ceil(0.95 * len(calib))) - 1])
        fpr = float((others_held[name] > t).mean())
        cells = [f"{(others_attacked[k][name][attacks[k][0]] > t).mean():.3f}" for k in keys]
        lines.append(f"| {name} | {t:.4f} | {fpr:.3f} | " + " | ".join(cells) + " |")
    lines += ["", "Why: the model's accuracy on each squeezer's copy of the clean calibration "
              "images, and the share of successful adversarial examples whose squeezed copy "
              "still gets the adversarial class (the squeezer did not undo the attack, so the "
              "two answers agree and the score stays low):", "",
              "| squeezer | clean acc. squeezed | " + " | ".join(f"{n} {e}" for n, e in keys) +
              " |", "|---|---|" + "---|" * len(keys)]
    for spec in specs:
        acc = float((squeezed_clean[spec] == y_test[:args.calibration]).mean())
        lines.append(f"| {spec} | {acc:.3f} | " +
                     " | ".join(f"{kept[k][spec]:.3f}" for k in keys) + " |")
    summary = {"clean_accuracy": float(clean_right.mean()),
               "successful": {k: int(v[0].sum()) for k, v in attacks.items()}, "best": best}
    return lines, summary


# ------------------------------------------------------------------------------------------
# Randomized smoothing


def smoothing_upstream(sess):
    from bastion.protos import pb
    from bastion.protos import codec

    async def call(message):
        images = codec.decode_request(message)["image"]
        names = [o.name for o in message.outputs] or ["logits"]
        reply = pb.ModelInferResponse(model_name=message.model_name, id=message.id)
        codec.encode_response(reply, dict(zip(names, sess.run(names, {"image": images}))))
        return reply
    return call


def certify_images(sess, images, sigma, n0, n, alpha) -> list[tuple[int, float]]:
    """(smoothed class or -1, certified radius) per image, through the stage itself."""
    from bastion.detectors.smoothing import RandomizedSmoothing, SmoothingOptions
    from bastion.protos import pb
    from bastion.protos import codec
    stage = RandomizedSmoothing(SmoothingOptions(sigma=sigma, n0=n0, n=n, alpha=alpha,
                                                 batch_size=256, concurrency=1))
    call = smoothing_upstream(sess)

    async def run():
        out = []
        for index, image in enumerate(images):
            message = pb.ModelInferRequest(model_name="fashion-mnist", id=f"eval-{index}")
            codec.encode_request(message, {"image": image[None]})
            state = stage.prepare(message, {}, f"eval-{index}")
            reply = await call(message)
            result = await stage.on_response(state, reply, call)
            out.append((int(result.parameters["bastion.smoothed_class"]),
                        float(result.parameters["bastion.certified_radius"])))
        return out
    return asyncio.run(run())


def finetune_with_noise(train, base, x_train, y_train, sigma, epochs, seed):
    import copy

    import torch
    import torch.nn.functional as F
    torch.manual_seed(seed)
    model = copy.deepcopy(base).train()
    opt = torch.optim.Adam(model.parameters(), lr=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(x_train)
    y = torch.from_numpy(y_train)
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(0, len(perm), 128):
            idx = perm[i:i + 128]
            # The noise the stage adds: x + N(0, sigma^2), clipped to [0, 1].
            noisy = (x[idx] + sigma * torch.randn(x[idx].shape, generator=gen)).clamp(0, 1)
            loss = F.cross_entropy(model(noisy)[0], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        print(f"    sigma={sigma} epoch {epoch + 1}/{epochs}: loss {total / len(perm):.4f}",
              flush=True)
    return model.eval()


def export_onnx(train, model, path, example):
    import torch
    warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export",
                            category=DeprecationWarning)
    torch.onnx.export(model, (torch.from_numpy(example),), str(path), dynamo=False,
                      opset_version=17, input_names=["image"], output_names=list(train.OUTPUTS),
                      dynamic_axes={n: {0: "batch"} for n in ("image", *train.OUTPUTS)})


def evaluate_smoothing(args, train, base, sess, x_test, y_test) -> tuple[list[str], dict]:
    idx = np.linspace(0, len(x_test) - 1, args.smooth).round().astype(int)
    images, labels = x_test[idx], y_test[idx]
    models = [("shipped model", sess, None)]
    info = {}
    if args.finetune_epochs:
        x_train_u8, y_train = train.load_split("train")
        x_train = (x_train_u8.astype(np.float32) / 255.0)[:, None]
        tmp = tempfile.TemporaryDirectory()
        info["tmp"] = tmp
        for sigma in args.sigmas:
            t0 = time.time()
            print(f"  fine-tuning with noise sigma={sigma} ({args.finetune_epochs} epochs)",
                  flush=True)
            tuned = finetune_with_noise(train, base, x_train, y_train, sigma,
                                        args.finetune_epochs, args.seed)
            path = pathlib.Path(tmp.name) / f"noise-{sigma}.onnx"
            export_onnx(train, tuned, path, x_test[:2])
            tuned_sess = session(path)
            diff = np.abs(run_logits(tuned_sess, x_test[:2000])
                          - torch_logits(tuned, x_test[:2000]))
            acc = float((run_logits(tuned_sess, x_test).argmax(1) == y_test).mean())
            noisy_acc = float((run_logits(tuned_sess, np.clip(
                x_test + sigma * np.random.default_rng(0).standard_normal(x_test.shape,
                                                                           dtype=np.float32),
                0, 1)).argmax(1) == y_test).mean())
            info[sigma] = (acc, noisy_acc, float(diff.max()), time.time() - t0)
            models.append((f"noise-trained, sigma {sigma}", tuned_sess, sigma))
    lines = ["| base model | sigma | clean acc. (subset) | abstain | " +
             " | ".join(f"certified acc. r={r}" for r in RADII) + " | max certifiable r |",
             "|---|---|---|---|" + "---|" * len(RADII) + "---|"]
    results = {}
    from scipy.stats import norm
    for name, model_sess, trained_sigma in models:
        clean = float((run_logits(model_sess, images).argmax(1) == labels).mean())
        for sigma in args.sigmas:
            if trained_sigma is not None and trained_sigma != sigma:
                continue
            t0 = time.time()
            answers = certify_images(model_sess, images, sigma, args.n0, args.n, args.alpha)
            classes = np.array([a[0] for a in answers])
            radii = np.array([a[1] for a in answers])
            right = classes == labels
            cells = [f"{(right & (radii >= r)).mean():.3f}" for r in RADII]
            top = sigma * norm.ppf(args.alpha ** (1 / args.n))
            lines.append(f"| {name} | {sigma} | {clean:.3f} | {(classes == -1).mean():.3f} | "
                         + " | ".join(cells) + f" | {top:.3f} |")
            results[(name, sigma)] = (right, radii)
            print(f"  {name} sigma={sigma}: " + ", ".join(cells) +
                  f" [{time.time() - t0:.0f}s]", flush=True)
    return lines, {"models": info, "results": results, "count": len(images)}


# ------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_options(ap, calibration=1000, attack=1000, smooth=500, sigmas=[0.25, 0.5], n0=100, n=1000,
                alpha=0.001, finetune_epochs=3, threads=1, seed=1234, out=DOC,
                skip_squeeze=False, skip_smoothing=False)
    args = ap.parse_args()

    import torch
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.time()
    train = training_module()
    x_u8, y_test = train.load_split("t10k")
    x_test = (x_u8.astype(np.float32) / 255.0)[:, None]
    sess = session(ONNX_PATH)
    model = torch_model_from_onnx(train)
    onnx_logits = run_logits(sess, x_test)
    diff = float(np.abs(onnx_logits - torch_logits(model, x_test)).max())
    accuracy = float((onnx_logits.argmax(1) == y_test).mean())
    print(f"rebuilt torch model vs ONNX over {len(x_test)} test images: max |diff| {diff:.2e}; "
          f"accuracy {accuracy:.4f}", flush=True)
    if diff > 1e-4:
        raise SystemExit("the rebuilt model does not match the ONNX file")

    out = [f"Generated by `python3 tools/eval_squeeze_smoothing.py` "
           f"(--calibration {args.calibration} --attack {args.attack} --smooth {args.smooth} "
           f"--sigmas {' '.join(map(str, args.sigmas))} --n0 {args.n0} --n {args.n} "
           f"--alpha {args.alpha} --finetune-epochs {args.finetune_epochs} --threads "
           f"{args.threads} --seed {args.seed}).", "",
           f"Rebuilt torch CNN vs the shipped ONNX file, all {len(x_test)} test images: max "
           f"|logit difference| {diff:.1e}; accuracy (onnxruntime) {accuracy:.4f}.", ""]
    if not args.skip_squeeze:
        lines, summary = evaluate_squeezing(args, train, model, sess, x_test, y_test)
        ok = {k: v for k, v in summary["successful"].items()}
        out += ["### Feature squeezing: detection rate of successful adversarial examples at a "
                "5 % FPR", "",
                f"Threshold: 95th percentile of the scores of test images 0-{args.calibration - 1}"
                f" (clean). Attacks on test images {args.calibration}-"
                f"{args.calibration + args.attack - 1}; the model is right on "
                f"{summary['clean_accuracy']:.3f} of them, and an attack counts where it then "
                "turns a right answer wrong (successful adversarial examples: " +
                ", ".join(f"{n} {e}: {c}" for (n, e), c in ok.items()) + "). FPR held-out = "
                "share of the clean attacked-set images above the threshold.", ""]
        out += lines + [""]
    if not args.skip_smoothing:
        lines, summary = evaluate_smoothing(args, train, model, sess, x_test, y_test)
        out += [f"### Randomized smoothing: certified accuracy (L2), {summary['count']} test "
                f"images (every {len(x_test) // summary['count']}th), n0={args.n0}, "
                f"n={args.n}, alpha={args.alpha}", ""]
        out += lines + [""]
        tuned = [(s, v) for s, v in summary["models"].items() if s != "tmp"]
        if tuned:
            out += ["Noise-trained copies (fine-tuned from the shipped weights on the 60,000 "
                    f"training images, {args.finetune_epochs} epochs, Adam 5e-4 cosine, batch "
                    "128, x + N(0, sigma^2) clipped to [0, 1]):", "",
                    "| sigma | test acc. (clean, 10,000) | test acc. (one noisy copy) | "
                    "max \\|onnx - torch\\| | fine-tune time |", "|---|---|---|---|---|"]
            out += [f"| {s} | {a:.4f} | {na:.4f} | {d:.1e} | {t:.0f} s |"
                    for s, (a, na, d, t) in tuned] + [""]
    out.append(f"Total run time {time.time() - started:.0f} s ({args.threads} thread(s)).")
    block = "\n".join(out)
    print("\n" + block)
    write_generated(args.out, block, "Quality: feature squeezing and randomized smoothing")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
