"""An early exit inside an exported classifier: windows that look clearly benign after the first
``layer`` transformer layers skip the rest.

A linear head (fitted by ``tools/training/fit_early_exit.py``: standardised [CLS] + masked-mean
hidden state of layer ``layer`` -> P(attack), a scikit-learn logistic regression) scores every
window after ``layer`` layers. Windows whose exit score is below the graph input ``exit_gate``
leave there; only the others (gathered into a smaller batch) run the remaining layers and the
model's own head. So a benign prompt costs about ``layer / layers`` of the full model, and an
escalated window gets exactly the full model's logits.

The exported graph takes one more input, ``exit_gate`` (float32 scalar): the stage feeds the
manifest's gate, and a gate of 0 or below escalates every window (the plain model's outputs,
which is what stages reading the ``embedding`` need). A window that exits gets the logits
``[0, z - log(k), ...]`` (benign 0, each of the k attack labels z - log k), so its attack
probability, summed over the attack labels, is the exit score sigmoid(z) < gate; its
``embedding`` is its layer-``layer`` embedding.

BERT-style checkpoints (``model.bert`` with ``embeddings``, ``encoder.layer``, ``pooler`` and
a ``classifier`` head) are supported; the export fails clearly for others.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib

# The graph input holding the gate, and the gate that escalates every window: the runtime's
# names (the encoder feeds the input).
from bastion.detectors.encoder import EXIT_INPUT, NO_EXIT

__all__ = ["ExitHead", "EXIT_FILE", "EXIT_INPUT", "EXIT_WEIGHT", "NO_EXIT", "wrap_with_exit"]

#: The head's file in a checkpoint folder (the export picks it up).
EXIT_FILE = "early_exit.json"
#: The head's weight in the graph (the int8 export leaves the MatMul reading it in float).
EXIT_WEIGHT = "exit_weight"


@dataclasses.dataclass(frozen=True)
class ExitHead:
    """The fitted exit: after ``layer`` layers, z = ((features - mean) / scale) . coef +
    intercept over features = [CLS state, masked mean state]; exit when sigmoid(z) < gate."""
    layer: int
    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float
    gate: float
    fitted: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        width = len(self.coef)
        if not (len(self.mean) == len(self.scale) == width) or width % 2:
            raise ValueError("early exit head: mean, scale and coef must have one equal, even "
                             "length ([CLS] + mean features)")
        if self.layer < 1:
            raise ValueError("early exit head: layer must be >= 1")
        if not 0.0 < self.gate < 1.0:
            raise ValueError("early exit head: gate must be in (0, 1)")

    @classmethod
    def load(cls, path: pathlib.Path) -> "ExitHead":
        data = json.loads(path.read_text(encoding="utf-8"))
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})

    def save(self, path: pathlib.Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=1) + "\n")

    def manifest_entry(self) -> dict:
        """What the classifier manifest records (the stage feeds ``gate``)."""
        return {"layer": self.layer, "gate": self.gate, "input": EXIT_INPUT,
                **({"fitted": self.fitted} if self.fitted else {})}


def wrap_with_exit(model, head: ExitHead, token_types: bool):
    """The classifier as a torch module (input_ids, attention_mask [, token_type_ids],
    exit_gate) -> (logits, L2-normalised masked-mean embedding), with the exit."""
    import torch

    bert = getattr(model, "bert", None)
    if bert is None or not hasattr(model, "classifier") or bert.pooler is None:
        raise ValueError(f"early exit: {type(model).__name__} is not a BERT-style sequence "
                         "classifier (model.bert with a pooler, model.classifier)")
    layers = bert.encoder.layer
    if head.layer >= len(layers):
        raise ValueError(f"early exit after layer {head.layer}, but the model has "
                         f"{len(layers)} layers")
    width = bert.config.hidden_size
    if len(head.coef) != 2 * width:
        raise ValueError(f"early exit head has {len(head.coef)} weights; this model needs "
                         f"{2 * width} ([CLS] + mean of {width})")
    attack_labels = model.config.num_labels - 1

    def pooled(hidden, mask):
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)

    def normalised(vectors):
        return vectors / vectors.norm(p=2, dim=1, keepdim=True).clamp(min=1e-12)

    def deeper_block(block, hidden, additive):
        """``block`` (a BertLayer, eval mode) written out with explicit head counts: the
        library's reshape to (batch, seq, -1, head) cannot run on an empty batch, which is
        what the gathered rest is when every window exits."""
        attention = block.attention.self
        heads, size = attention.num_attention_heads, attention.attention_head_size
        batch, seq = hidden.shape[0], hidden.shape[1]

        def split(projected):
            return projected.reshape(batch, seq, heads, size).transpose(1, 2)

        query, key = split(attention.query(hidden)), split(attention.key(hidden))
        value = split(attention.value(hidden))
        scores = query @ key.transpose(2, 3) * size ** -0.5 + additive
        context = (torch.softmax(scores, dim=-1) @ value).transpose(1, 2)
        context = context.reshape(batch, seq, heads * size)
        output = block.attention.output
        attended = output.LayerNorm(output.dense(context) + hidden)
        inner = block.intermediate.intermediate_act_fn(block.intermediate.dense(attended))
        return block.output.LayerNorm(block.output.dense(inner) + attended)

    class EarlyExit(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            # (w / scale) folded in: z = features . w' + b'
            coef = torch.tensor(head.coef, dtype=torch.float32)
            scale = torch.tensor(head.scale, dtype=torch.float32)
            mean = torch.tensor(head.mean, dtype=torch.float32)
            # a [features, 1] matrix, the MatMul the int8 export leaves in float
            self.register_buffer(EXIT_WEIGHT, (coef / scale).unsqueeze(1))
            self.register_buffer("exit_bias", torch.tensor(
                head.intercept - float((coef * mean / scale).sum()), dtype=torch.float32))

        def run(self, input_ids, attention_mask, exit_gate, token_type_ids=None):
            hidden = bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
            additive = ((1.0 - attention_mask[:, None, None, :].to(hidden.dtype))
                        * torch.finfo(hidden.dtype).min)
            for block in layers[:head.layer]:
                hidden = block(hidden, attention_mask=additive)
            features = torch.cat([hidden[:, 0], pooled(hidden, attention_mask)], dim=1)
            z = (features @ self.exit_weight).squeeze(1) + self.exit_bias
            exit_logits = torch.stack(
                [torch.zeros_like(z)] + [z - math.log(attack_labels)] * attack_labels, dim=1)
            embedding = normalised(pooled(hidden, attention_mask))
            # Windows at or above the gate run the rest of the model, as one smaller batch.
            deeper = torch.nonzero(torch.sigmoid(z) >= exit_gate).squeeze(1)
            rest, rest_mask = hidden.index_select(0, deeper), additive.index_select(0, deeper)
            for block in layers[head.layer:]:
                rest = deeper_block(block, rest, rest_mask)
            logits = model.classifier(bert.pooler(rest))
            rest_embedding = normalised(pooled(rest, attention_mask.index_select(0, deeper)))
            return (exit_logits.index_copy(0, deeper, logits),
                    embedding.index_copy(0, deeper, rest_embedding))

        def forward(self, input_ids, attention_mask, exit_gate):
            return self.run(input_ids, attention_mask, exit_gate)

    class EarlyExitWithTokenTypes(EarlyExit):
        def forward(self, input_ids, attention_mask, token_type_ids, exit_gate):
            return self.run(input_ids, attention_mask, exit_gate, token_type_ids)

    return (EarlyExitWithTokenTypes if token_types else EarlyExit)().eval()
