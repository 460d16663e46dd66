"""White-box attack suite on the Fashion-MNIST demo CNN (IBM ART 1.20.1 + torch), for the image
defense evaluation (tools/eval_image_defense.py).

Every attack is untargeted, on images in [0, 1] ([N, 1, 28, 28] float32), against the CNN
rebuilt in torch from the shipped ONNX file's weights. ``ATTACKS`` names each configuration;
``run_attack`` computes one. The black-box attack (Square through the sidecar) and the adaptive
attack (which needs the fitted detector) live in tools/image_blackbox.py and
tools/image_adaptive.py.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import pathlib

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
ONNX_PATH = REPO / "bastion" / "demo_models" / "fashion-mnist" / "model.onnx"


@dataclasses.dataclass(frozen=True)
class Attack:
    name: str          # as the report names it
    kind: str          # fgsm | pgd_linf | pgd_l2 | cw_l2 | deepfool
    eps: float = 0.0   # L-inf or L2 budget (unused by cw_l2 / deepfool: minimal perturbation)
    steps: int = 0


#: The white-box part of the suite. FGSM 0.1 is the one generic attack the detector's
#: combiner is fitted on; every other row is an attack it never saw.
ATTACKS = (
    Attack("FGSM Linf 0.1", "fgsm", 0.1, 1),
    Attack("PGD Linf 0.03", "pgd_linf", 0.03, 20),
    Attack("PGD Linf 0.05", "pgd_linf", 0.05, 20),
    Attack("PGD Linf 0.1", "pgd_linf", 0.1, 20),
    Attack("PGD L2 1.5", "pgd_l2", 1.5, 20),
    Attack("CW L2", "cw_l2", 0.0, 30),
    Attack("DeepFool", "deepfool", 0.0, 50),
)
FIT_ATTACK = "FGSM Linf 0.1"


def onnx_path(model: str) -> pathlib.Path:
    """The ONNX file `bastion upstream` serves as ``model``."""
    return REPO / "bastion" / "demo_models" / model / "model.onnx"


def training_module():
    path = REPO / "tools" / "training" / "train_fashion_mnist.py"
    spec = importlib.util.spec_from_file_location("train_fashion_mnist", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def torch_model(onnx_path: pathlib.Path = ONNX_PATH):
    """The demo CNN in torch with the ONNX file's weights (returns every graph output)."""
    train = training_module()
    return train.load_onnx_weights(train.build_model(), onnx_path).eval()


class LogitsOnly:
    """Wraps the multi-output CNN as a torch module returning the logits (what ART needs)."""

    def __new__(cls, model):
        import torch

        class _Logits(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, x):
                return self.inner(x)[0]

        return _Logits(model).eval()


def art_classifier(model):
    import torch
    from art.estimators.classification import PyTorchClassifier
    return PyTorchClassifier(model=LogitsOnly(model), loss=torch.nn.CrossEntropyLoss(),
                             input_shape=(1, 28, 28), nb_classes=10, clip_values=(0.0, 1.0),
                             device_type="cpu")


def run_attack(attack: Attack, classifier, x: np.ndarray, y: np.ndarray,
               seed: int = 0, batch: int = 128) -> np.ndarray:
    """Adversarial copies of ``x`` (float32) under ``attack`` (labels ``y`` for the
    loss-based attacks)."""
    from art.attacks.evasion import DeepFool, FastGradientMethod, ProjectedGradientDescent
    np.random.seed(seed)  # ART's random starts draw from numpy's global generator
    if attack.kind == "fgsm":
        art = FastGradientMethod(classifier, norm=np.inf, eps=attack.eps, batch_size=batch)
    elif attack.kind in ("pgd_linf", "pgd_l2"):
        norm = np.inf if attack.kind == "pgd_linf" else 2
        art = ProjectedGradientDescent(classifier, norm=norm, eps=attack.eps,
                                       eps_step=2.5 * attack.eps / attack.steps,
                                       max_iter=attack.steps, num_random_init=1,
                                       batch_size=batch, verbose=False)
    elif attack.kind == "cw_l2":
        return carlini_wagner_l2(classifier.model, x, y, steps=attack.steps, batch=batch)
    elif attack.kind == "deepfool":
        art = DeepFool(classifier, max_iter=attack.steps, epsilon=0.02, nb_grads=10,
                       batch_size=batch, verbose=False)
    else:
        raise ValueError(f"unknown attack kind {attack.kind!r}")
    labels = None if attack.kind in ("cw_l2", "deepfool") else np.eye(10, dtype=np.float32)[y]
    return art.generate(x.astype(np.float32), y=labels).astype(np.float32)


def carlini_wagner_l2(model, x: np.ndarray, y: np.ndarray, steps: int = 100,
                      binary_steps: int = 4, initial_const: float = 1.0, lr: float = 0.05,
                      confidence: float = 0.0, batch: int = 128) -> np.ndarray:
    """Carlini & Wagner's L2 attack (2017), batched in torch: tanh change of variables, Adam on
    ||delta||^2 + c * max(z_true - max_other z, -confidence), binary search on c per image;
    keeps each image's smallest successful perturbation (the clean image where none was found).
    Written here rather than ART's CarliniL2Method, whose per-iteration line search costs
    ~100x more CPU for the same attack on this model. ``model(x)`` returns the logits."""
    import torch
    out = []
    for start in range(0, len(x), batch):
        clean = torch.from_numpy(x[start:start + batch].astype(np.float32))
        labels = torch.from_numpy(y[start:start + batch].astype(np.int64))
        n = len(clean)
        w_clean = torch.atanh((clean * 2 - 1).clamp(-1 + 1e-6, 1 - 1e-6))
        const = torch.full((n,), initial_const)
        lower, upper = torch.zeros(n), torch.full((n,), 1e10)
        best_l2 = torch.full((n,), float("inf"))
        best = clean.clone()
        onehot = torch.nn.functional.one_hot(labels, 10).bool()
        for _ in range(binary_steps):
            w = w_clean.clone().requires_grad_(True)
            optimizer = torch.optim.Adam([w], lr=lr)
            succeeded = torch.zeros(n, dtype=torch.bool)
            for _ in range(steps):
                adv = (torch.tanh(w) + 1) / 2
                logits = model(adv)
                true = logits[onehot]
                other = logits.masked_fill(onehot, -1e9).max(dim=1).values
                l2 = ((adv - clean) ** 2).flatten(1).sum(1)
                loss = (l2 + const * (true - other + confidence).clamp_min(0)).sum()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    wins = (other - true > confidence) | ((logits.argmax(1) != labels)
                                                          & (confidence == 0))
                    improved = wins & (l2 < best_l2)
                    best_l2 = torch.where(improved, l2, best_l2)
                    best[improved] = adv[improved].detach()
                    succeeded |= wins
            with torch.no_grad():  # binary search: smaller c where it worked, larger where not
                upper = torch.where(succeeded, torch.minimum(upper, const), upper)
                lower = torch.where(succeeded, lower, torch.maximum(lower, const))
                const = torch.where(upper < 1e9, (lower + upper) / 2, const * 10)
        out.append(best.numpy())
    return np.concatenate(out).astype(np.float32)


def quantize(images: np.ndarray) -> np.ndarray:
    """As a client sends an image it stored: uint8 per pixel, back to [0, 1]."""
    return (np.clip(np.rint(images * 255), 0, 255) / 255).astype(np.float32)
