"""L-inf gradient-sign attacks for the evaluation tools (torch; white-box, untargeted).

One loop serves FGSM (one step of eps), BIM (iterated FGSM from the clean image) and PGD (Madry
et al.: the same from a uniform random start in the eps-ball): each step moves by ``step`` times
the sign of the loss gradient and projects back on the eps-ball and on [0, 1]. ``model(x)[0]``
must be the logits.
"""
from __future__ import annotations

import numpy as np


def linf_attack(model, x: np.ndarray, y: np.ndarray, eps: float, steps: int,
                step: float | None = None, random_start: bool = False, seed: int = 0,
                batch: int = 500) -> np.ndarray:
    """Adversarial copies of ``x`` (float32, same shape). ``step`` defaults to eps for one
    step and 2.5 eps / steps otherwise (Madry et al.'s choice)."""
    import torch
    import torch.nn.functional as F
    if step is None:
        step = eps if steps == 1 else 2.5 * eps / steps
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(x), batch):
        clean = torch.from_numpy(x[i:i + batch])
        labels = torch.from_numpy(y[i:i + batch])
        adv = clean.clone()
        if random_start:
            noise = torch.rand(clean.shape, generator=generator) * 2 * eps - eps
            adv = (clean + noise).clamp(0, 1)
        for _ in range(steps):
            adv.requires_grad_(True)
            loss = F.cross_entropy(model(adv)[0], labels)
            grad, = torch.autograd.grad(loss, adv)
            with torch.no_grad():
                adv = adv + step * grad.sign()
                adv = torch.min(torch.max(adv, clean - eps), clean + eps).clamp(0, 1)
        out.append(adv.detach().numpy())
    return np.concatenate(out).astype(np.float32)
