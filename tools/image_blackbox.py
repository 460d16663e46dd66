"""Black-box attack through the sidecar for the image attack suite: ART's Square attack
(Andriushchenko et al. 2020, L-inf, score-based) whose every query is a real request to
`bastion serve`, as `bastion replay --mutate square` runs it (bastion/replay/image_attack.py).

The attacker sees what a client sees: the softmax of the answered logits; a refused query tells
it nothing. The suite's query budget is Square's ``max_iter``, and every predict ART makes is a
query (no cache), as the recorded numbers in docs/quality-image-defense.md were measured.
"""
from __future__ import annotations

import numpy as np

from bastion.replay.image_attack import square_attack


def square_through(endpoint, x: np.ndarray, y: np.ndarray, eps: float, max_iter: int,
                   seed: int = 0) -> np.ndarray:
    """Square-attack copies of ``x`` computed by querying ``endpoint`` (tools/image_e2e.py)."""
    adversarial, _ = square_attack(endpoint.logits, x, y, eps, query_budget=max_iter + 2,
                                   seed=seed, cache=False, n_classes=10)
    return adversarial
