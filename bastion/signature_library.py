"""`bastion signatures ...`: manage a known-attack library for ``detect.attack_library``.

    bastion signatures add FILE.jsonl[.gz] [FILE ...] --library PATH [--encoder DIR]
        [--text-field text] [--family-field family | --family NAME]
        [--source-field source | --source NAME] [--label attack] [--dedupe 0.98]
        [--init empty|starter]
    bastion signatures info [--library PATH]

``add`` embeds each record's text with the encoder (the one the stage uses: the library
records its identity) and appends an entry (embedding, family, source, id = sha1(text)[:12]) to
the library (PATH.npz + PATH.json), skipping ids already present and, with ``--dedupe C``,
texts whose cosine to an entry of the same family is at least C. Records whose ``label`` is
set to anything but ``--label`` (default ``attack``; ``any`` keeps all) are skipped. A missing
library is created, empty or (``--init starter``) from the bundled starter library. The
sidecar picks the change up without a restart. The text itself is never stored.
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
            if args.label != "any" and record.get("label", args.label) != args.label:
                continue
            text = record.get(args.text_field)
            if not isinstance(text, str) or not text.strip():
                raise SystemExit(f"{path}:{number}: no text in field {args.text_field!r}")
            family = args.family or record.get(args.family_field)
            if not isinstance(family, str) or not family:
                raise SystemExit(f"{path}:{number}: no family (field {args.family_field!r}; "
                                 "or pass --family)")
            source = args.source or record.get(args.source_field) or \
                f"{pathlib.Path(path).name}#L{number}"
            yield text, family, str(source)


def _cmd_add(args: argparse.Namespace) -> int:
    from bastion.detectors.attack_library import (AttackLibrary, LibraryError,
                                                  default_library_path, entry_id,
                                                  library_paths)
    from bastion.detectors.embedding import EncoderOptions, Encoder

    try:
        encoder = Encoder(args.encoder, EncoderOptions(threads=args.threads, max_chunks=1))
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
    before = len(library)
    embeddings = encoder.encode(texts)
    added = library.add(embeddings, families, sources, [entry_id(t) for t in texts],
                        dedupe=args.dedupe)
    written = library.save(npz_path)
    print(f"{npz_path}: {before} -> {len(library)} entries ({added} added, "
          f"{len(texts) - added} skipped as duplicates); wrote {', '.join(map(str, written))}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import collections

    from bastion.detectors.attack_library import (AttackLibrary, LibraryError,
                                                  default_library_path, library_paths)

    path = args.library or default_library_path()
    try:
        library = AttackLibrary.load(path)
    except LibraryError as err:
        print(f"bastion signatures info: {err}", file=sys.stderr)
        return 1
    npz_path, json_path = library_paths(path)
    print(f"{npz_path} (+ {json_path.name}): {len(library)} entries, encoder "
          f"{library.encoder.get('weights')}, dim {library.encoder.get('dim')}")
    for family, count in sorted(collections.Counter(library.families).items()):
        print(f"  {family}: {count}")
    return 0


def add_parser(sub) -> None:
    parser = sub.add_parser("signatures", help="manage the known-attack embedding library "
                                               "(detect.attack_library)")
    commands = parser.add_subparsers(dest="signatures_command", required=True)
    add = commands.add_parser("add", help="embed attack texts (JSONL) and append them")
    add.add_argument("files", nargs="+", metavar="FILE.jsonl")
    add.add_argument("--library", required=True, help="library path (NAME.npz; NAME.json beside)")
    add.add_argument("--encoder", default="models/minilm",
                     help="exported encoder folder (bastion models export minilm)")
    add.add_argument("--text-field", default="text")
    add.add_argument("--family-field", default="family")
    add.add_argument("--family", help="family for every record (instead of --family-field)")
    add.add_argument("--source-field", default="source")
    add.add_argument("--source", help="source for every record (instead of --source-field)")
    add.add_argument("--label", default="attack",
                     help="keep records with this label (or none); 'any' keeps all")
    add.add_argument("--dedupe", type=float, default=None, metavar="COSINE",
                     help="skip texts this close to an entry of the same family")
    add.add_argument("--init", choices=("empty", "starter"), default="empty",
                     help="what a new library starts from")
    add.add_argument("--threads", type=int, default=2)
    add.set_defaults(func=_cmd_add)
    info = commands.add_parser("info", help="summarise a library (default: the starter)")
    info.add_argument("--library")
    info.set_defaults(func=_cmd_info)
