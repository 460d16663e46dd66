"""`bastion signatures ...`: manage a known-attack library for ``detect.attack_library``.

    bastion signatures add FILE.jsonl[.gz] [FILE ...] --library PATH [--encoder DIR]
        [--text-field text] [--family-field family | --family NAME]
        [--source-field source | --source NAME] [--label attack] [--dedupe 0.98]
        [--init empty|starter] [--windows first|all]
    bastion signatures info [--library PATH]

``add`` embeds each record's text with the encoder (the one the stage uses: the library
records its identity) and appends an entry (embedding, family, source, id = sha1(text)[:12]) to
the library (PATH.npz + PATH.json): one per text, its first 256-token window (``--windows
all``: one per window). Ids already present are skipped and, with ``--dedupe C``, texts whose
cosine to an entry of the same family is at least C. ``--label attack`` (default)
adds known attacks and reads the records labelled ``attack`` (or unlabelled); ``--label
benign`` adds benign reference texts (records labelled ``benign`` or unlabelled; family
``benign`` unless the record has one), which ``detect.attack_library`` subtracts (``contrast``).
A missing library is created, empty or (``--init starter``) from the bundled starter library.
The sidecar picks the change up without a restart. The text itself is never stored.
"""
from __future__ import annotations

import argparse
import gzip
import json
import pathlib
import sys


def _records(path: str, args: argparse.Namespace):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise SystemExit(f"{path}:{number}: not JSON ({err.msg})") from None
            if record.get("label", args.label) != args.label:
                continue
            text = record.get(args.text_field)
            if not isinstance(text, str) or not text.strip():
                raise SystemExit(f"{path}:{number}: no text in field {args.text_field!r}")
            family = args.family or record.get(args.family_field) or (
                "benign" if args.label == "benign" else None)
            if not isinstance(family, str) or not family:
                raise SystemExit(f"{path}:{number}: no family (field {args.family_field!r}; "
                                 "or pass --family)")
            source = args.source or record.get(args.source_field) or \
                f"{pathlib.Path(path).name}#L{number}"
            yield text, family, str(source)


def _as_the_stage_sees(texts: list[str], args: argparse.Namespace) -> list[str]:
    """The texts after the request transforms of ``--through CONFIG``'s ``--model`` chain that
    come before its ``detect.attack_library`` stage (the sidecar folds confusables and strips
    invisible characters before the stage embeds): an entry must match what the stage sees.
    The result is aligned with ``texts``."""
    import asyncio

    from bastion.calibration_steps import run_texts
    from bastion.config import ConfigError, load_config
    from bastion.proxy.pipeline import build_pipeline
    try:
        config = load_config(args.through)
    except ConfigError as err:
        raise SystemExit(f"bastion signatures add: --through: {err}") from None
    model = args.model or next(iter(config.models), None)
    if model not in config.models:
        raise SystemExit(f"bastion signatures add: --through {args.through} has no model "
                         f"{model!r}")
    pipeline = build_pipeline(model, config.models[model], stages=config.built_stages(model))
    kinds = [r.config.kind_name for r in pipeline.runners]
    upto = kinds.index("detect.attack_library") if "detect.attack_library" in kinds else None
    input_name = next((n for n, s in config.models[model].inputs.items() if s.kind == "text"),
                      "prompt")
    _, refused, seen = asyncio.run(run_texts(pipeline, input_name, texts, upto=upto,
                                             kind="transform"))
    # A text a transform refuses never reaches the stage; it is kept as written.
    return [after if why is None else before
            for before, after, why in zip(texts, seen, refused)]


def _cmd_add(args: argparse.Namespace) -> int:
    from bastion.detectors.known_attacks import (AttackLibrary, LibraryError,
                                                 default_library_path, entry_id, library_paths)
    import numpy as np

    from bastion.detectors.encoder import Encoder, EncoderOptions

    try:
        encoder = Encoder(args.encoder, EncoderOptions(threads=args.threads,
                                                       max_chunks=args.max_chunks))
    except (FileNotFoundError, ValueError) as err:
        print(f"bastion signatures add: {err}", file=sys.stderr)
        return 2
    npz_path, json_path = library_paths(args.library)
    try:
        if json_path.exists():
            library = AttackLibrary.load(npz_path)
        elif args.init == "starter":
            library = AttackLibrary.load(default_library_path())
        else:
            library = AttackLibrary.empty_for(encoder)
        library.check_encoder(encoder)
    except LibraryError as err:
        print(f"bastion signatures add: {err}", file=sys.stderr)
        return 2
    texts, families, sources = [], [], []
    for path in args.files:
        for text, family, source in _records(path, args):
            texts.append(text)
            families.append(family)
            sources.append(source)
    if not texts:
        print("bastion signatures add: no records to add", file=sys.stderr)
        return 2
    if args.through:
        texts = _as_the_stage_sees(texts, args)
    before = len(library)
    windows = args.windows
    rows, row_families, row_sources, row_ids = [], [], [], []
    for text, family, source, embedded in zip(texts, families, sources, encoder.embed(texts)):
        for number, row in enumerate(embedded if windows == "all" else embedded[:1]):
            rows.append(row)
            row_families.append(family)
            row_sources.append(source)
            row_ids.append(entry_id(text) + (f"#{number}" if number else ""))
    added = library.add(np.stack(rows), row_families, row_sources, row_ids,
                        dedupe=args.dedupe, label=args.label)
    written = library.save(npz_path)
    print(f"{npz_path}: {before} -> {len(library)} entries ({added} added from {len(texts)} "
          f"texts, {len(rows) - added} skipped as duplicates); wrote "
          f"{', '.join(map(str, written))}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import collections

    from bastion.detectors.known_attacks import (AttackLibrary, LibraryError,
                                                 default_library_path, library_paths)

    path = args.library or default_library_path()
    try:
        library = AttackLibrary.load(path)
    except LibraryError as err:
        print(f"bastion signatures info: {err}", file=sys.stderr)
        return 1
    npz_path, json_path = library_paths(path)
    print(f"{npz_path} (+ {json_path.name}): {len(library)} entries "
          f"({library.n_benign} benign), encoder {library.encoder.get('weights')}, "
          f"dim {library.encoder.get('dim')}")
    counts = collections.Counter(zip(library.labels, library.families))
    for (label, family), count in sorted(counts.items()):
        print(f"  {label} {family}: {count}")
    return 0


def add_parser(sub) -> None:
    parser = sub.add_parser("signatures", help="manage the known-attack embedding library "
                                               "(detect.attack_library)")
    commands = parser.add_subparsers(dest="signatures_command", required=True)
    add = commands.add_parser("add", help="embed attack (or benign) texts from JSONL and "
                                          "append them")
    add.add_argument("files", nargs="+", metavar="FILE.jsonl")
    add.add_argument("--library", required=True, help="library path (NAME.npz; NAME.json beside)")
    add.add_argument("--encoder", default="models/minilm",
                     help="exported encoder folder (bastion models export minilm)")
    add.add_argument("--text-field", default="text")
    add.add_argument("--family-field", default="family")
    add.add_argument("--family", help="family for every record (instead of --family-field)")
    add.add_argument("--source-field", default="source")
    add.add_argument("--source", help="source for every record (instead of --source-field)")
    add.add_argument("--label", choices=("attack", "benign"), default="attack",
                     help="add known attacks (default) or benign reference texts; records "
                          "labelled otherwise are skipped")
    add.add_argument("--dedupe", type=float, default=None, metavar="COSINE",
                     help="skip texts this close to an entry of the same family")
    add.add_argument("--init", choices=("empty", "starter"), default="empty",
                     help="what a new library starts from")
    add.add_argument("--windows", choices=("first", "all"), default="first",
                     help="entries per text: its first window (default) or every window")
    add.add_argument("--max-chunks", type=int, default=8, help="windows per text at most")
    add.add_argument("--threads", type=int, default=2)
    add.add_argument("--through", metavar="CONFIG", help="embed each text as the model's chain "
                     "hands it to detect.attack_library: after that config's request "
                     "transforms (confusables folded, invisible characters stripped)")
    add.add_argument("--model", help="with --through: the model whose chain (default: the "
                     "config's first)")
    add.set_defaults(func=_cmd_add)
    info = commands.add_parser("info", help="summarise a library (default: the starter)")
    info.add_argument("--library")
    info.set_defaults(func=_cmd_info)
