"""Black-box attack through the sidecar: ART's Square attack (Andriushchenko et al. 2020,
L-inf, score-based) whose every query is a real request to `bastion serve`.

The attacker sees what a client sees: the softmax of the answered logits. A refused query tells
it nothing useful, so it counts as no progress: the attacker's loss for it is the clean answer's
(probability 1 on the true class; the attacker knows which of its images a query came from, and
that image's true label). The query budget is Square's ``max_iter`` (one query per image and
iteration, plus one to start).
"""
from __future__ import annotations

import numpy as np


def square_through(endpoint, x: np.ndarray, y: np.ndarray, eps: float, max_iter: int,
                   seed: int = 0) -> np.ndarray:
    """Square-attack copies of ``x`` computed by querying ``endpoint`` (tools/image_e2e.py)."""
    from art.attacks.evasion import SquareAttack
    from art.estimators.classification import BlackBoxClassifierNeuralNetwork

    clean = x.reshape(len(x), -1)

    def predict(batch: np.ndarray) -> np.ndarray:
        answers = endpoint.logits(batch.astype(np.float32))
        out = np.zeros((len(batch), 10), dtype=np.float32)
        # the query's own image: the clean one it stays within eps of (L-inf)
        origin = np.abs(batch.reshape(len(batch), 1, -1) - clean[None]).max(axis=2).argmin(axis=1)
        for row, logits in enumerate(answers):
            if logits is None:
                out[row, y[origin[row]]] = 1.0
            else:
                e = np.exp(logits - logits.max())
                out[row] = e / e.sum()
        return out

    classifier = BlackBoxClassifierNeuralNetwork(predict, input_shape=x.shape[1:],
                                                 nb_classes=10, clip_values=(0.0, 1.0))
    np.random.seed(seed)  # Square draws its squares from numpy's global generator
    attack = SquareAttack(classifier, norm=np.inf, eps=eps, max_iter=max_iter, nb_restarts=1,
                          p_init=0.3, batch_size=len(x), verbose=False)
    labels = np.eye(10, dtype=np.float32)[y]
    return attack.generate(x.astype(np.float32), y=labels).astype(np.float32)
