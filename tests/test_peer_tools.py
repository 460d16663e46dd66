"""tools/peers: the parts that need no peer installed (prompt sampling, JSONL plumbing, the refusal
to let jailguard reach the model hub)."""
from __future__ import annotations

import io
import os
import json

import pytest

from tools.peers import bench_peer_cpu, peer_models, score_peers


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def test_sample_prompts_unique_round_robin_and_seeded(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ["short"] * 3 + [f"a{i}" for i in range(5)])
    write_jsonl(tmp_path / "b.jsonl", ["short"] + [f"b{i}" * 50 for i in range(5)])
    texts = bench_peer_cpu.sample_prompts(8, seed=1, data_dir=tmp_path)
    assert len(texts) == len(set(texts)) == 8
    assert sum(t.startswith("a") for t in texts) >= 3 and sum(t.startswith("b") for t in texts) >= 3
    assert texts == bench_peer_cpu.sample_prompts(8, seed=1, data_dir=tmp_path)
    with pytest.raises(ValueError, match="unique texts"):
        bench_peer_cpu.sample_prompts(20, data_dir=tmp_path)


def test_measure_refuses_duplicate_prompts():
    with pytest.raises(ValueError, match="unique"):
        bench_peer_cpu.measure_here("securevector", ["same", "same"])


def test_score_records_one_row_per_text_with_each_peer(monkeypatch):
    fakes = {"jailguard": lambda: (lambda text: {"score": len(text) / 100}),
             "securevector": lambda: (lambda text: {"score": 0.5, "top_class": "benign"})}
    monkeypatch.setattr(peer_models, "LOADERS", fakes)
    lines = io.StringIO('{"id": "x", "label": "attack", "text": "hello", "extra": 1}\n\n{"text": "hi"}\n')
    rows = list(score_peers.score_records(score_peers.read_records(lines), ["jailguard", "securevector"]))
    assert rows == [
        {"id": "x", "label": "attack", "jailguard": 0.05, "securevector": 0.5, "securevector_top_class": "benign"},
        {"jailguard": 0.02, "securevector": 0.5, "securevector_top_class": "benign"},
    ]


def test_read_records_needs_text():
    with pytest.raises(SystemExit, match="line 1"):
        list(score_peers.read_records(io.StringIO('{"prompt": "no text field"}\n')))


def test_jailguard_never_starts_without_the_offline_encoder(tmp_path, monkeypatch):
    monkeypatch.setenv("JAILGUARD_MODEL_DIR", str(tmp_path))
    with pytest.raises(SystemExit, match="build_jailguard_encoder"):
        peer_models.encoder_dir()
    (tmp_path / peer_models.ENCODER_FILE).write_bytes(b"stub")
    monkeypatch.delenv("JAILGUARD_MODEL_URL", raising=False)
    assert peer_models.encoder_dir() == tmp_path
    assert "127.0.0.1" in os.environ["JAILGUARD_MODEL_URL"]
