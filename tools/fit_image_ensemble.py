#!/usr/bin/env python3
"""Fit the image profile's ``detect.feature_ensemble`` state and threshold, on exactly what the
stage sees in enforce mode.

Each image goes through the profile's own request stages (built from the profile by the
sidecar's code: ``validate.tensor``, ``transform.bit_depth``...), and the real `bastion upstream`
answers the transformed image with every output the stage reads. On Fashion-MNIST *training*
images only (the evaluation uses test images):

* ``--gaussians`` images: the per-layer class-conditional Gaussians (labels = training labels);
* ``--combiner`` other images, clean and FGSM-attacked (L-inf ``--eps``, the one generic attack
  the combiner sees; the attacker sends uint8 images, as a client would), for the logistic
  combiner;
* ``--threshold`` other clean images: each stage's threshold at its ``--target-fpr``.

Every ``detect.feature_ensemble`` stage of the profile is fitted (the shipped profile has two:
the layer ensemble, the logit-margin rule and the logit-gap rule).

    python3 tools/fit_image_ensemble.py            # writes the files the profile names
    python3 tools/fit_image_ensemble.py --profile my-copy.yaml --target-fpr ensemble=0.02

Needs torch (the FGSM copies) and the Debian package dataset-fashion-mnist.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import pathlib
import sys

import numpy as np

TOOLS = pathlib.Path(__file__).resolve().parent
REPO = TOOLS.parent
sys.path.insert(0, str(TOOLS))
sys.path.insert(0, str(REPO))

PROFILE = REPO / "bastion" / "profiles" / "image-classifier.yaml"
MODEL = "fashion-mnist"
STAGE = "detect.feature_ensemble"
#: Benign false-positive rate per stage id (the profile's ensemble, margin and logit-gap rules).
DEFAULT_FPR = {"ensemble": 0.03, "margin": 0.015, "gaps": 0.0075}


class ProfileView:
    """The profile's model pipeline, as the sidecar builds it (uncalibrated stages allowed)."""

    def __init__(self, profile: pathlib.Path, model: str = MODEL):
        from bastion.config import load_config
        from bastion.proxy.pipeline import build_pipeline
        self.config = load_config(profile, allow_uncalibrated=True)
        self.model = model
        self.pipeline = build_pipeline(model, self.config.models[model], allow_uncalibrated=True)
        #: The profile's detect.feature_ensemble stages (runner, stage), in pipeline order.
        self.stages = [(r, r.config.impl) for r in self.pipeline.response_runners
                       if r.config.kind_name == STAGE]
        if not self.stages:
            raise SystemExit(f"{profile}: no {STAGE} stage for model {model!r}")

    def wanted(self) -> list[str]:
        names: list[str] = []
        for _, stage in self.stages:
            names += [n for n in stage.wanted() if n not in names]
        return names

    def transform(self, images: np.ndarray, input_name: str = "image") -> np.ndarray:
        """What the request stages forward for ``images`` in enforce mode (refuses to go on if
        a request stage would block one of them)."""
        from bastion.proxy.pipeline import RequestContext
        ctx = RequestContext(request_id="fit", model_name=self.model, model_version="",
                             inputs={input_name: images.astype(np.float32)},
                             datatypes={input_name: "FP32"})
        asyncio.run(self.pipeline.run(ctx, stop_on_block=False))
        blocking = [d for d in ctx.decisions if d.action == "block"]
        if blocking:
            raise SystemExit(f"fit: request stage {blocking[0].stage} blocks benign images")
        return np.asarray(ctx.inputs[input_name], dtype=np.float32)

    def answers(self, upstream: str, images: np.ndarray, batch: int = 500) -> dict:
        """The upstream's outputs the stages read, for the transformed ``images``."""
        from bastion.calibrate import upstream_outputs
        return upstream_outputs(self.config, self.model, {"image": self.transform(images)},
                                self.wanted(), upstream, batch)

    def scores(self, answers: dict) -> dict[str, np.ndarray]:
        """Each stage's per-row score (by stage id) of ``answers``."""
        return {runner.config.stage_id: stage.score_arrays(answers)
                for runner, stage in self.stages}

    def thresholds(self) -> dict[str, float]:
        return {runner.config.stage_id: runner.config.common.threshold
                for runner, _ in self.stages}


def fit(view: ProfileView, upstream: str, counts: tuple[int, int, int], eps: float,
        target_fpr: dict[str, float], seed: int) -> list[dict]:
    """Fit every ensemble stage of the profile; write its state and threshold file."""
    import torch

    import image_attacks as attacks
    from bastion.calibrate import threshold_at_fpr
    from bastion.detectors.feature_ensemble import fit_ensemble, save_ensemble
    from tests.harness import fashion_mnist

    torch.set_num_threads(1)
    images, labels = fashion_mnist("train")
    n_gauss, n_comb, n_thr = counts
    order = np.random.default_rng(seed).permutation(len(images))
    gauss = order[:n_gauss]
    comb = order[n_gauss:n_gauss + n_comb]
    thr = order[n_gauss + n_comb:n_gauss + n_comb + n_thr]
    classifier = attacks.art_classifier(attacks.torch_model(attacks.onnx_path(view.model)))
    fgsm = attacks.Attack("FGSM", "fgsm", eps, 1)
    attacked = attacks.quantize(attacks.run_attack(fgsm, classifier, images[comb], labels[comb],
                                                   seed=seed))
    gauss_answers = view.answers(upstream, images[gauss])
    benign_answers = view.answers(upstream, images[comb])
    attacked_answers = view.answers(upstream, attacked)
    held_answers = view.answers(upstream, images[thr])
    records = []
    for runner, stage in view.stages:
        stage_id = runner.config.stage_id
        options = stage.options
        model = fit_ensemble(gauss_answers, labels[gauss], benign_answers, attacked_answers,
                             list(options.outputs), options.logits,
                             source=f"upstream:{view.model}:{'+'.join(stage.wanted())}",
                             gaps=options.gaps)
        scores = model.score(held_answers)
        fpr = target_fpr.get(stage_id, target_fpr.get("*", 0.02))
        threshold = threshold_at_fpr(scores, fpr)
        note = (f"Gaussians on {n_gauss}, combiner on {n_comb} clean + {n_comb} FGSM L-inf "
                f"{eps} (uint8) Fashion-MNIST training images, threshold on {n_thr} others "
                f"(seed {seed}); each image through the profile's request stages and `bastion "
                "upstream` (tools/fit_image_ensemble.py)")
        state = save_ensemble(stage.state, model, extra={"fit": note})
        quantiles = [0.5, 0.9, 0.95, 0.99, 0.999]
        record = {
            "threshold": float(threshold), "target_fpr": fpr,
            "observed_fpr": float(np.mean(scores >= threshold)), "model": view.model,
            "stage": stage_id, "scored": int(len(scores)), "fit": note,
            "features": model.feature_names,
            "weights": [float(w) for w in model.weights],
            "quantiles": {f"p{q * 100:g}": float(v)
                          for q, v in zip(quantiles, np.quantile(scores, quantiles))},
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        path = pathlib.Path(runner.config.common.threshold_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
        record["state_file"], record["threshold_file"] = str(state), str(path)
        records.append(record)
    return records


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", type=pathlib.Path, default=PROFILE,
                    help="writes the state and threshold files this profile names")
    ap.add_argument("--gaussians", type=int, default=10000)
    ap.add_argument("--combiner", type=int, default=3000)
    ap.add_argument("--threshold", type=int, default=6000)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--target-fpr", action="append", default=[], metavar="[STAGE=]FPR",
                    help=f"per stage id (default {DEFAULT_FPR})")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--model", default=MODEL, help="the profile's model entry to fit")
    args = ap.parse_args(argv)
    target = dict(DEFAULT_FPR)
    for item in args.target_fpr:
        stage, _, value = item.rpartition("=")
        target[stage or "*"] = float(value)

    from image_e2e import Upstream
    view = ProfileView(args.profile, args.model)
    upstream = Upstream()
    try:
        records = fit(view, upstream.address, (args.gaussians, args.combiner, args.threshold),
                      args.eps, target, args.seed)
    finally:
        upstream.stop()
    for record in records:
        print(f"{record['stage']}: wrote {record['state_file']} and {record['threshold_file']}: "
              f"threshold {record['threshold']:.4f} (observed FPR {record['observed_fpr']:.4f}), "
              "weights " + ", ".join(f"{n} {w:+.2f}" for n, w in zip(record["features"],
                                                                      record["weights"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
