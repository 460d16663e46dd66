"""Adaptive white-box attack on the image profile (Carlini & Wagner 2017; Tramer et al. 2020):
the attacker knows the model, the request transform and the fitted detectors, thresholds
included.

PGD (L-inf, random start) on  cross-entropy(model(squeeze(x)))  -  lambda * sum over the
detectors of relu(score(x) - threshold + 1), where ``squeeze`` is the profile's bit-depth reduction passed straight
through for the gradient (BPDA, Athalye et al. 2018) and ``score`` is a differentiable torch
copy of ``detect.feature_ensemble``'s log-odds (same Gaussians, standardisation and weights).
Several lambdas are tried; per image the attacker keeps the copy its own copy of the defense
says is answered and misclassified (or, failing that, the one with the lowest score).
"""
from __future__ import annotations

import numpy as np


def torch_ensemble(model):
    """A function torch outputs dict -> log-odds, equal to ``EnsembleModel.score``."""
    import torch
    from bastion.detectors.feature_ensemble import MARGIN_FLOOR

    layers = []
    for gaussian in model.gaussians:
        layers.append((torch.tensor(gaussian.whitener_), torch.tensor(gaussian.means_w_)))
    if model.gaps:  # its Gaussian (the last) is scored against the predicted class's mean
        gap_classes = torch.tensor(model.gaussians[-1].classes_)
    mean, scale = torch.tensor(model.mean), torch.tensor(model.scale)
    weights = torch.tensor(model.weights)

    def score(outputs: dict) -> "torch.Tensor":
        columns = []
        for name, (whitener, means_w) in zip(model.outputs, layers):
            z = outputs[name].reshape(len(outputs[name]), -1).double() @ whitener
            d2 = ((z[:, None, :] - means_w[None]) ** 2).sum(-1).min(dim=1).values
            columns.append(torch.log1p(torch.sqrt(d2.clamp_min(1e-12))))
        if model.logits:
            top = outputs[model.logits].double().topk(2, dim=1).values
            columns.append(torch.log(top[:, 0] - top[:, 1] + MARGIN_FLOOR))
        if model.gaps:
            values = outputs[model.gaps].double()
            top = values.max(dim=1, keepdim=True).values
            whitener, means_w = layers[-1]
            z = torch.log(top - values + MARGIN_FLOOR) @ whitener
            rows = torch.searchsorted(gap_classes, values.argmax(dim=1))
            rows = rows.clamp(max=len(means_w) - 1)
            d2 = ((z - means_w[rows]) ** 2).sum(-1)
            columns.append(torch.log1p(torch.sqrt(d2.clamp_min(1e-12))))
        features = torch.stack(columns, dim=1)
        return ((features - mean) / scale) @ weights + model.bias

    return score


def adaptive_pgd(net, detectors, x: np.ndarray, y: np.ndarray, eps: float, steps: int,
                 bits: int, lambdas=(0.0, 1.0, 10.0), seed: int = 0) -> np.ndarray:
    """Per image the best of the lambdas' PGD copies (see module doc). ``detectors``: the
    profile's (EnsembleModel, threshold) pairs; the penalty sums over them, and an image counts
    as a win only below every threshold."""
    import torch
    import torch.nn.functional as F

    names = ("logits", "features", "conv1_stats", "conv2_stats")  # the CNN's return order
    scorers = [(torch_ensemble(model), threshold) for model, threshold in detectors]
    levels = 2 ** bits - 1

    def forward(images):
        """logits, the summed penalty, and the largest score-over-threshold margin."""
        squeezed = images + (torch.round(images * levels) / levels - images).detach()
        outputs = dict(zip(names, net(squeezed)))
        over = torch.stack([fn(outputs) - threshold for fn, threshold in scorers], dim=1)
        return outputs["logits"], F.relu(over + 1.0).sum(dim=1), over.max(dim=1).values

    clean = torch.from_numpy(x.astype(np.float32))
    labels = torch.from_numpy(y.astype(np.int64))
    generator = torch.Generator().manual_seed(seed)
    step = 2.5 * eps / steps
    best = clean.clone()
    best_rank = torch.full((len(x),), float("inf"), dtype=torch.float64)
    for lam in lambdas:
        adv = (clean + (torch.rand(clean.shape, generator=generator) * 2 - 1) * eps).clamp(0, 1)
        for _ in range(steps):
            adv.requires_grad_(True)
            logits, penalty, _ = forward(adv)
            loss = F.cross_entropy(logits, labels, reduction="sum") - lam * penalty.sum()
            grad, = torch.autograd.grad(loss, adv)
            with torch.no_grad():
                adv = adv + step * grad.sign()
                adv = torch.min(torch.max(adv, clean - eps), clean + eps).clamp(0, 1)
        with torch.no_grad():
            quantised = torch.round(adv * 255) / 255  # what the client sends
            logits, _, over = forward(quantised)
            wins = (logits.argmax(1) != labels) & (over < 0)
            # rank: a win beats everything, then the lowest score over threshold
            rank = torch.where(wins, torch.full_like(over, -1e9), over.double())
            better = rank < best_rank
            best[better] = quantised[better]
            best_rank = torch.minimum(best_rank, rank)
    return best.numpy().astype(np.float32)
