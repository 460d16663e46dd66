"""The prompt-guard trainer's distillation set-up (tools/training/train_prompt_guard.py), on the
tiny random checkpoint of tests/test_classifier.py."""
import importlib.util
import pathlib
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests.test_classifier import make_checkpoint  # noqa: E402

TRAINING = pathlib.Path(__file__).resolve().parents[1] / "tools" / "training"
sys.path.insert(0, str(TRAINING))
spec = importlib.util.spec_from_file_location("train_prompt_guard", TRAINING / "train_prompt_guard.py")
trainer = importlib.util.module_from_spec(spec)
spec.loader.exec_module(trainer)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("teacher"))


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def test_a_full_depth_student_starts_as_the_teacher(teacher_dir):
    teacher, student = trainer.distillation_pair(teacher_dir, 2)
    ids = torch.tensor([[2, 10, 11, 12, 3], [2, 20, 21, 22, 3]])
    assert torch.allclose(_logits(teacher, ids), _logits(student, ids), atol=1e-6)


def test_a_shallow_student_keeps_the_first_layer_embeddings_and_head(teacher_dir):
    teacher, student = trainer.distillation_pair(teacher_dir, 1)
    assert student.config.num_hidden_layers == 1 and len(student.bert.encoder.layer) == 1
    t_layer, s_layer = teacher.bert.encoder.layer[0], student.bert.encoder.layer[0]
    for (name, a), (_, b) in zip(t_layer.named_parameters(), s_layer.named_parameters()):
        assert torch.equal(a, b), name
    assert torch.equal(teacher.classifier.weight, student.classifier.weight)
    assert s_layer.attention.self.query.weight is not t_layer.attention.self.query.weight
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    assert not torch.allclose(_logits(teacher, ids), _logits(student, ids))


def test_a_student_deeper_than_its_teacher_is_refused(teacher_dir):
    with pytest.raises(SystemExit, match="3-layer student cannot come from a 2-layer teacher"):
        trainer.distillation_pair(teacher_dir, 3)


def test_the_linear_probe_trains_the_head_only_and_restores_the_flags(teacher_dir):
    """LP-FT's first phase: the encoder (embeddings, layers) is unchanged, the pooler and
    classifier learn, and every parameter that was trainable before is trainable again."""
    import random

    import numpy as np
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(teacher_dir)
    model.bert.embeddings.word_embeddings.weight.requires_grad = False  # as train() does
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    rng = random.Random(0)
    encoded = [[2] + [rng.randrange(5, 40) for _ in range(rng.randrange(3, 9))] + [3]
               for _ in range(64)]
    labels = np.array([len(ids) % model.config.num_labels for ids in encoded])
    batches = trainer.Batches(encoded, labels, np.ones(64), 16, rng)
    losses = []
    trainer.linear_probe(model, batches, 12, torch.nn.CrossEntropyLoss(reduction="none"),
                         losses.append)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all(name.startswith(("bert.pooler.", "classifier.")) for name in changed)
    assert "classifier.weight" in changed
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert losses and "probe step 12/12" in losses[-1]
