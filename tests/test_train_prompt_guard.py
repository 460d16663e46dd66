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
