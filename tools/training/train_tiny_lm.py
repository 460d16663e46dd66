#!/usr/bin/env python3
"""Train `builtin:tiny-lm`, the small causal language model bundled for `detect.perplexity`.

Run from the repository root (450 steps, about 10 CPU-minutes on one core; 20 minutes wall
on the shared 2-core dev machine):

    pip install torch==2.13.0          # local CPU wheel; do not use any other torch spec
    python3 tools/training/train_tiny_lm.py            # --steps, --seed, --threads, --out-dir

What it does, all seeded (``--seed``, default 1234):

1. Reads the three public-domain / PSF corpora in ``/work/shared/data/text/corpus/`` (Jane
   Austen's novels, the World English Bible, the Python 3.11 docs), cuts each into units
   (paragraphs; Bible verses), and holds out 5 % of each corpus for evaluation: the units are cut
   into 100 contiguous blocks and every 20th block (``block % 20 == HELD_OUT_BLOCK``) is held
   out, so the held-out text is five separate 1 % stretches of each corpus, never seen in
   training (neither by the tokenizer nor by the model). :func:`split_corpus` is imported by
   ``tools/eval_perplexity.py`` so evaluation uses exactly this split.
2. Adds a little natural conversational text made from the *training* part only: questions
   (sentences ending in "?") from all three corpora and the quoted speech of Austen's
   characters, each as its own short document, so that the model has seen short standalone
   utterances (chat prompts look like that, prose paragraphs do not). The dev attack/benign
   JSONL files are never read.
3. Trains a byte-level BPE tokenizer (``tokenizers``, vocabulary 4096, special token
   ``<|endoftext|>``) on the training text.
4. Trains a GPT-style decoder (4 pre-LayerNorm blocks, d_model 128, 4 heads, MLP 512, GELU,
   learned positions, context 256, tied input/output embeddings) with AdamW on random
   256-token windows of the corpora (every document starts with ``<|endoftext|>``), the corpora
   mixed by fixed weights.
5. Exports to ONNX a graph that computes the per-token negative log-likelihood inside the graph
   (``input_ids``, ``attention_mask`` [batch, seq] int64 -> ``nll`` [batch, seq] float32; column
   0 is 0, column t is -log p(token t | tokens < t), padded positions are 0), checks it against
   torch, and writes ``model.onnx``, ``tokenizer.json`` and ``lm.json`` to ``--out-dir``
   (default ``bastion/lm/tiny-lm``), then prints the held-out perplexity per corpus measured
   with the runner the sidecar uses (``bastion.detectors.lm.LMRunner``).

Determinism: same seed, library versions and ``--threads`` give the same weights.
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import random
import re
import sys
import time
from pathlib import Path

import numpy as np

from bastion.options import add_options

CORPUS_DIR = Path("/work/shared/data/text/corpus")
CORPORA = {"austen": "janeausten_6_novels.txt.gz",
           "bible": "world_english_bible.txt.gz",
           "python_docs": "python311_docs_rst.txt.gz"}
# Share of training windows drawn from each source.
MIX = {"austen": 0.3, "bible": 0.2, "python_docs": 0.35, "conversational": 0.15}
EOT = "<|endoftext|>"
N_BLOCKS, HELD_OUT_EVERY, HELD_OUT_BLOCK = 100, 20, 7   # 5 blocks of 1 % each = 5 %
DOC_CHARS = 1500            # consecutive units are grouped into documents of about this size
_UNDERLINE = re.compile(r"^\s*([=#\-~*^+`'\".:_])\1{2,}\s*$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_QUOTE = re.compile(r"[“\"]([^”\"]{8,300})[”\"]")


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def read_corpus(name: str, corpus_dir: Path = CORPUS_DIR) -> str:
    with gzip.open(corpus_dir / CORPORA[name], "rt", encoding="utf-8") as handle:
        return handle.read()


def units(name: str, text: str) -> list[str]:
    """A corpus cut into units: paragraphs (prose unwrapped, indented blocks kept), or verses."""
    out: list[str] = []
    if name == "bible":
        for line in text.splitlines():
            line = " ".join(line.split())
            if line:
                out.append(line)
        return out
    for para in re.split(r"\n\s*\n", text):
        lines = [l.rstrip() for l in para.splitlines()
                 if l.strip() and not l.startswith("##### ") and not _UNDERLINE.match(l)]
        if not lines:
            continue
        if any(l[:1].isspace() for l in lines):   # code or an indented block: keep its lines
            out.append("\n".join(lines))
        else:
            out.append(" ".join(" ".join(lines).split()))
    return out


def split_corpus(name: str, corpus_dir: Path = CORPUS_DIR) -> tuple[list[str], list[str]]:
    """(train units, held-out units) of one corpus: 100 contiguous blocks, every 20th held out."""
    all_units = units(name, read_corpus(name, corpus_dir))
    train, held = [], []
    for index, unit in enumerate(all_units):
        block = index * N_BLOCKS // len(all_units)
        (held if block % HELD_OUT_EVERY == HELD_OUT_BLOCK else train).append(unit)
    return train, held


def documents(name: str, parts: list[str]) -> list[str]:
    """Consecutive units grouped into documents of about DOC_CHARS characters."""
    joiner = " " if name == "bible" else "\n\n"
    docs, current, size = [], [], 0
    for unit in parts:
        if current and size + len(unit) > DOC_CHARS:
            docs.append(joiner.join(current))
            current, size = [], 0
        current.append(unit)
        size += len(unit) + len(joiner)
    if current:
        docs.append(joiner.join(current))
    return docs


def sentences(unit: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(unit) if s]


def conversational(name: str, parts: list[str]) -> list[str]:
    """Short standalone utterances from training units: questions, and (Austen) quoted speech."""
    out = []
    for unit in parts:
        if "\n" in unit:
            continue  # code
        for sentence in sentences(unit):
            sentence = sentence.strip(" \"“”'‘’()")
            if sentence.endswith("?") and 3 <= len(sentence.split()) <= 30:
                out.append(sentence)
        if name == "austen":
            for match in _QUOTE.finditer(unit):
                quote = " ".join(match.group(1).split()).strip(" ,")
                if 3 <= len(quote.split()) <= 40:
                    out.append(quote)
    return list(dict.fromkeys(out))


def passages(parts: list[str], rng: random.Random, max_chars: int = 600) -> list[str]:
    """Held-out units cut into prompt-sized passages of 1-3 sentences (for calibration data)."""
    out = []
    for unit in parts:
        if "\n" in unit:
            pieces = [unit[:max_chars]]
        else:
            parts_ = sentences(unit)
            pieces, i = [], 0
            while i < len(parts_):
                take = rng.randint(1, 3)
                pieces.append(" ".join(parts_[i:i + take])[:max_chars])
                i += take
        out.extend(p for p in pieces if len(p) >= 12)
    return out


def heldout_passages(name: str, seed: int = 1234, limit: int | None = None) -> list[str]:
    """Prompt-sized passages of one corpus's held-out units (seeded sample of ``limit``)."""
    _, held = split_corpus(name)
    found = passages(held, random.Random(seed))
    if limit is not None and len(found) > limit:
        found = random.Random(seed + 1).sample(found, limit)
    return found


def heldout_documents(name: str, seed: int = 1234, limit: int | None = None) -> list[str]:
    """Held-out documents as the model saw training text (units grouped to ~1500 characters)."""
    _, held = split_corpus(name)
    found = documents(name, held)
    if limit is not None and len(found) > limit:
        found = random.Random(seed + 2).sample(found, limit)
    return found


def write_heldout_sample(path: Path, seed: int = 1234, per_corpus: int = 200) -> None:
    """Benign reference prompts the model never trained on, bundled for calibration and tests:
    held-out passages of the public-domain corpora (Austen, the World English Bible)."""
    rows = []
    for name in ("austen", "bible"):
        for index, text in enumerate(heldout_passages(name, seed, per_corpus)):
            rows.append({"id": f"{name}-heldout-{index}", "text": text, "label": "benign",
                         "family": f"heldout_{name}", "source": f"{CORPORA[name]} held-out "
                         f"blocks (block % {HELD_OUT_EVERY} == {HELD_OUT_BLOCK})"})
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def build_model(vocab: int, d_model: int, layers: int, heads: int, context: int):
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = heads
            self.ln1 = nn.LayerNorm(d_model)
            self.qkv = nn.Linear(d_model, 3 * d_model)
            self.proj = nn.Linear(d_model, d_model)
            self.ln2 = nn.LayerNorm(d_model)
            self.fc = nn.Linear(d_model, 4 * d_model)
            self.out = nn.Linear(4 * d_model, d_model)

        def forward(self, x, mask):
            batch, seq, dim = x.shape
            head_dim = dim // self.heads
            q, k, v = self.qkv(self.ln1(x)).split(dim, -1)
            q, k, v = (t.view(batch, seq, self.heads, head_dim).transpose(1, 2) for t in (q, k, v))
            att = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(head_dim)) + mask
            y = (att.softmax(-1) @ v).transpose(1, 2).reshape(batch, seq, dim)
            x = x + self.proj(y)
            return x + self.out(nn.functional.gelu(self.fc(self.ln2(x)), approximate="tanh"))

    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(vocab, d_model)
            self.pos = nn.Embedding(context, d_model)
            self.blocks = nn.ModuleList(Block() for _ in range(layers))
            self.ln = nn.LayerNorm(d_model)
            self.register_buffer("causal", torch.triu(torch.full((context, context), -1e9), 1),
                                 persistent=False)
            self.apply(self._init)
            for block in self.blocks:  # GPT-2: scale the residual projections
                for lin in (block.proj, block.out):
                    nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * layers))

        @staticmethod
        def _init(module):
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

        def hidden(self, ids):
            seq = ids.shape[1]
            x = self.tok(ids) + self.pos.weight[:seq]
            mask = self.causal[:seq, :seq]
            for block in self.blocks:
                x = block(x, mask)
            return self.ln(x)

        def loss(self, ids):
            logits = self.hidden(ids[:, :-1]) @ self.tok.weight.t()
            return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                               ids[:, 1:].reshape(-1))

        def forward(self, input_ids, attention_mask):
            """Per-token NLL: column 0 is 0; column t is -log p(id_t | ids_<t); pads are 0."""
            hidden = self.hidden(input_ids)[:, :-1]      # slice before the vocabulary projection
            logp = torch.log_softmax(hidden @ self.tok.weight.t(), -1)
            picked = torch.gather(logp, 2, input_ids[:, 1:, None])[..., 0]
            nll = torch.cat([torch.zeros_like(picked[:, :1]), -picked], 1)
            return nll * attention_mask.to(nll.dtype)

    return TinyLM()


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def train_tokenizer(texts, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def token_stream(tokenizer, docs: list[str]) -> np.ndarray:
    eot = tokenizer.token_to_id(EOT)
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(docs, add_special_tokens=False):
        ids.append(eot)
        ids.extend(encoding.ids)
    return np.asarray(ids, dtype=np.int64)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_options(parser, out_dir="bastion/lm/tiny-lm", seed=1234, threads=1, steps=450, batch=32,
                lr=2e-3, vocab=4096, d_model=128, layers=4, heads=4, context=256)
    args = parser.parse_args(argv)

    import torch
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    started = time.time()

    train_docs: dict[str, list[str]] = {}
    held_docs: dict[str, list[str]] = {}
    chat: list[str] = []
    for name in CORPORA:
        train_units, held_units = split_corpus(name)
        train_docs[name] = documents(name, train_units)
        held_docs[name] = documents(name, held_units)
        chat.extend(conversational(name, train_units))
        print(f"{name}: {len(train_units)} train units ({sum(map(len, train_units))} chars), "
              f"{len(held_units)} held out ({sum(map(len, held_units))} chars)", file=sys.stderr)
    random.Random(args.seed).shuffle(chat)
    train_docs["conversational"] = chat
    print(f"conversational: {len(chat)} utterances ({sum(map(len, chat))} chars)",
          file=sys.stderr)

    tokenizer = train_tokenizer((d for docs in train_docs.values() for d in docs), args.vocab)
    streams = {name: token_stream(tokenizer, docs) for name, docs in train_docs.items()}
    for name, stream in streams.items():
        print(f"tokens {name}: {len(stream)}", file=sys.stderr)
    print(f"tokenizer: {tokenizer.get_vocab_size()} tokens ({time.time() - started:.0f}s)",
          file=sys.stderr)

    model = build_model(tokenizer.get_vocab_size(), args.d_model, args.layers, args.heads,
                        args.context)
    params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {params}", file=sys.stderr)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95))
    names = list(MIX)
    weights = np.array([MIX[n] for n in names])
    warmup = max(1, args.steps // 20)
    window = args.context + 1
    model.train()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / warmup) * (
            0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / args.steps))))
        for group in optimizer.param_groups:
            group["lr"] = lr
        sources = rng.choice(len(names), size=args.batch, p=weights)
        rows = []
        for source in sources:
            stream = streams[names[source]]
            start = int(rng.integers(0, len(stream) - window))
            rows.append(stream[start:start + window])
        batch = torch.from_numpy(np.stack(rows))
        loss = model.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step:4d} loss {loss.item():.3f} lr {lr:.2e} "
                  f"({time.time() - started:.0f}s)", file=sys.stderr)
    model.eval()

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    export_onnx(model, out_dir / "model.onnx", tokenizer.get_vocab_size())
    quantize_int8(out_dir / "model.onnx", out_dir / "model_int8.onnx",
                  out_dir / "tokenizer.json", calibration_texts(args.seed), args.context)
    write_heldout_sample(out_dir / "heldout_sample.jsonl", args.seed)
    (out_dir / "lm.json").write_text(json.dumps({
        "name": "tiny-lm",
        "default_model": "model_int8.onnx",
        # u8s8 int8 saturates without VNNI (detectors/lm.py default_model_file).
        "default_model_without_vnni": "model.onnx",
        "context": args.context,
        "prefix": EOT,
        "output": "nll",
        "architecture": {"type": "gpt", "vocab": tokenizer.get_vocab_size(),
                         "d_model": args.d_model, "layers": args.layers, "heads": args.heads,
                         "context": args.context, "parameters": params},
        "training": {"script": "tools/training/train_tiny_lm.py", "seed": args.seed,
                     "steps": args.steps, "batch": args.batch, "lr": args.lr,
                     "threads": args.threads, "torch": torch.__version__},
    }, indent=2) + "\n")

    # Held-out perplexity, measured with the runner the sidecar uses, for both files.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from bastion.detectors.lm import LMRunner
    check_export(model, LMRunner(out_dir / "model.onnx", threads=args.threads),
                 held_docs["austen"][:4])
    for variant in ("model.onnx", "model_int8.onnx"):
        print(f"{variant}:")
        heldout_report(LMRunner(out_dir / variant, threads=args.threads), held_docs)
    for path in sorted(out_dir.iterdir()):
        print(f"{path}: {path.stat().st_size} bytes")
    print(f"done in {time.time() - started:.0f}s", file=sys.stderr)
    return 0


def calibration_texts(seed: int = 1234, per_source: int = 64) -> list[str]:
    """Training text (never held-out) that sets the int8 model's fixed activation ranges."""
    rng = random.Random(seed + 3)
    texts, chat = [], []
    for name in CORPORA:
        train_units, _ = split_corpus(name)
        texts.extend(rng.sample(documents(name, train_units), per_source))
        chat.extend(conversational(name, train_units))
    texts.extend(rng.sample(chat, per_source))
    return texts


def quantize_int8(source: Path, target: Path, tokenizer_path: Path, texts: list[str],
                  context: int) -> None:
    """Static int8 quantization (QOperator: QLinearMatMul; weights int8 per output channel,
    activations uint8 with MinMax ranges fixed on training text): about 1.6x faster on CPU,
    held-out perplexity within 0.1 % (docs/tiny-lm.md). Fixed (not dynamic) activation
    scales keep a prompt's scores independent of what it is batched with."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    eot = tokenizer.token_to_id(EOT)
    feeds = []
    for text in texts:
        ids = np.array([[eot] + tokenizer.encode(text, add_special_tokens=False).ids[
            :context - 1]], dtype=np.int64)
        feeds.append({"input_ids": ids, "attention_mask": np.ones_like(ids)})

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(feeds)

        def get_next(self):
            return next(self.items, None)

    quantize_static(str(source), str(target), Reader(), quant_format=QuantFormat.QOperator,
                    per_channel=True, op_types_to_quantize=["MatMul"],
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)


def heldout_report(runner, held_docs: dict[str, list[str]]) -> None:
    for name in CORPORA:
        docs = held_docs[name]
        nll = tokens = 0.0
        for start in range(0, len(docs), 64):
            for item in runner.token_nll(docs[start:start + 64]):
                nll += float(item.nll.sum())
                tokens += len(item.nll)
        chars = sum(map(len, docs))
        print(f"held-out {name}: {len(docs)} documents, {int(tokens)} tokens, "
              f"perplexity {math.exp(nll / tokens):.2f}, bits/char {nll / chars / math.log(2):.3f}")
    _, held_units = split_corpus("austen")
    snippets = conversational("austen", held_units)[:2000]
    items = runner.token_nll(snippets)
    total = sum(len(i.nll) for i in items)
    nll = sum(float(i.nll.sum()) for i in items)
    print(f"held-out conversational (austen questions/quotes): {len(snippets)} utterances, "
          f"{total} tokens, perplexity {math.exp(nll / total):.2f}")


def export_onnx(model, path: Path, vocab: int) -> None:
    import torch
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
            "nll": {0: "batch", 1: "seq"}}
    torch.onnx.export(model, (ids, mask), str(path), input_names=["input_ids", "attention_mask"],
                      output_names=["nll"], dynamic_axes=axes, opset_version=17, dynamo=False)
    share_transposed_weights(path)


def share_transposed_weights(path: Path) -> None:
    """The exporter stores the tied output projection as a second, transposed copy of the
    embedding; replace the copy by a Transpose node (onnxruntime folds it at load): -2 MB."""
    import onnx
    from onnx import helper, numpy_helper
    model = onnx.load(str(path))
    arrays = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    big = [name for name, a in arrays.items() if a.ndim == 2 and a.size >= 1 << 16]
    for copy in big:
        for original in big:
            if (copy != original and arrays[copy].shape == arrays[original].shape[::-1]
                    and np.array_equal(arrays[copy], arrays[original].T)):
                kept = [i for i in model.graph.initializer if i.name != copy]
                del model.graph.initializer[:]
                model.graph.initializer.extend(kept)
                model.graph.node.insert(0, helper.make_node("Transpose", [original], [copy],
                                                            name=f"{copy}_shared"))
                break
        else:
            continue
        break
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def check_export(model, runner, texts: list[str]) -> None:
    """The ONNX graph (through the runner) agrees with torch on the same tokens."""
    import torch
    prefix = runner.prefix_ids
    for text, item in zip(texts, runner.token_nll(texts)):
        ids = prefix + runner.tokenizer.encode(text, add_special_tokens=False).ids
        ids = ids[:runner.context]
        with torch.no_grad():
            ref = model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0]
        ref = ref.numpy()[len(prefix):]
        got = item.nll[:len(ref)]
        diff = float(np.max(np.abs(got - ref)))
        if diff > 1e-4:
            raise SystemExit(f"export check failed: max |onnx - torch| = {diff}")
    print("export check: onnx matches torch (max diff <= 1e-4)", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
