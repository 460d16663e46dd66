"""``bastion replay --mutate square`` end to end: pick the corpus's clean tensor records, attack
them through the live sidecar (bastion/replay/image_attack.py), save the adversarial images, and
replay each final image once more so its verdict lands in the report like any other record.

Identities: the attacker's queries carry ``x-client-id: bastion-replay-square``, and its
finished images are checked once more under ``bastion-replay-square-final`` (did the answer
misclassify?). Where the sidecar's ``clients.identity`` reads that header, the two are different
clients, as for an attacker who submits what it found from a fresh identity; with ``peer``
identity (the default) they and the replay are one client.

Runs after the main replay: the attacker's refused queries may escalate against its client
identity (throttle, block), and that must not touch the benign records' outcomes.
"""
from __future__ import annotations

import asyncio
import dataclasses
import pathlib

import numpy as np

from bastion import corpus
from bastion.replay import image_attack
from bastion.replay.outcome import ReplayError

ADVERSARIAL_FILE = "square-adversarial.npz"


@dataclasses.dataclass
class SquareRun:
    """What the attack did, for report.json (``image_attack``) and the evasion table."""
    outcomes: list
    mutator_of: dict[str, str]
    fooled: dict[str, bool]  # mutated record id -> its final image answered and misclassified
    summary: dict


def _clean_images(args, rows: list[dict], tensor_input: str, shape):
    """The first --attack-images benign tensor records (reshaped to ``shape``, --shape), as
    (ids, images, request shape, class or -1)."""
    loader = corpus.TensorLoader(pathlib.Path(args.data).parent)
    chosen = [r for r in rows if r.get("label") == "benign" and "tensor" in r
              and r.get("input", tensor_input) == tensor_input][:args.attack_images]
    if not chosen:
        raise ReplayError("bastion replay: --mutate square needs benign tensor records (the "
                          "clean images it starts from); the data has none")
    arrays = [corpus.row_tensor(loader, r, f"{args.data}:{r.get('_line', '?')}", shape)
              for r in chosen]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ReplayError("bastion replay: --mutate square needs clean images of one shape "
                          f"(got {', '.join(str(list(s)) for s in sorted(shapes))})")
    request_shape = arrays[0].shape
    images = np.stack([a[0] if a.shape[0] == 1 else a for a in arrays])
    ids = [str(r.get("id") or f"row-{i}") for i, r in enumerate(chosen)]
    classes = np.array([int(r.get("class", -1)) for r in chosen])
    return ids, images, request_shape, classes


def check_options(args) -> None:
    """The square options, checked before anything is sent (the attack runs last)."""
    if args.attack_images < 1:
        raise ReplayError("bastion replay: --attack-images must be at least 1")
    if args.pad_queries < 0:
        raise ReplayError("bastion replay: --pad-queries must not be negative")
    image_attack.check_settings(args.eps, args.query_budget)


def run_square(args, rows: list[dict], tensor_input: str | None, shape, out: pathlib.Path,
               progress: bool) -> SquareRun:
    from bastion.replay.online import replay_online
    check_options(args)
    if not tensor_input:
        raise ReplayError("bastion replay: --mutate square needs the model's tensor input "
                          "(--input)")
    ids, images, request_shape, classes = _clean_images(args, rows, tensor_input, shape)
    oracle = image_attack.SidecarOracle(args.target, args.model, tensor_input, request_shape,
                                        output=args.attack_output, timeout=args.timeout,
                                        concurrency=args.concurrency)
    padded = image_attack.PaddedOracle(oracle, args.pad_queries)
    try:
        counted = image_attack.CachedOracle(padded, images)
        clean_classes = counted.classes(images)
        padded.pool = images[clean_classes >= 0]  # pads: clean images the defense answers
        labels = np.where(classes >= 0, classes, clean_classes)
        attackable = labels >= 0  # a refused clean image without a class cannot be attacked
        if not attackable.any():
            raise ReplayError("bastion replay: --mutate square: every clean image was refused")
        low, high = float(min(0.0, images.min())), float(max(1.0, images.max()))
        # ``counted`` already caches and counts (over every clean image): no second cache
        adversarial, _ = image_attack.square_attack(
            counted, images[attackable], labels[attackable], args.eps, args.query_budget,
            seed=args.seed, clip=(low, high), cache=False)
    finally:
        oracle.close()
    # The finished images as a new client sends them (its own x-client-id): an attacker the
    # client tier blocked may still submit what it found under another identity.
    fresh = dataclasses.replace(oracle, client_id=f"{oracle.client_id}-final")
    try:
        final = image_attack.classes_of(fresh(adversarial))
    finally:
        fresh.close()
    kept = [i for i, ok in zip(ids, attackable) if ok]
    out.mkdir(parents=True, exist_ok=True)
    path = (out / ADVERSARIAL_FILE).resolve()
    np.savez_compressed(path, adversarial=adversarial, clean=images[attackable],
                        labels=labels[attackable])
    mutated = [{"id": f"{row_id}~{image_attack.NAME}", "label": "attack",
                "family": image_attack.FAMILY, "tensor": f"{path}#adversarial[{i}]",
                "shape": list(request_shape), "input": tensor_input}
               for i, row_id in enumerate(kept)]
    records = corpus.encode_rows(mutated, path, args.model)
    outcomes = asyncio.run(replay_online(records, args.target, args.concurrency, args.rate,
                                         args.timeout, progress))
    label_of = labels[attackable]
    fooled = {row["id"]: bool(cls >= 0 and cls != label)
              for row, cls, label in zip(mutated, final, label_of)}
    queries = counted.queries[attackable]
    summary = {
        "attack": "Square (IBM ART), L-inf, score-based, through the sidecar",
        "eps": args.eps, "query_budget": args.query_budget, "images": len(kept),
        "clean_refused": int((clean_classes < 0).sum()),
        "queries_mean": float(queries.mean()), "queries_max": int(queries.max()),
        "refused_queries": int(counted.refused[attackable].sum()),
        "padding_queries": padded.sent,
        "fooled_model": int(sum(fooled.values())),
        "max_linf": float(np.abs(adversarial - images[attackable]).max()),
        "adversarial_file": str(path),
    }
    return SquareRun(outcomes, {row["id"]: image_attack.NAME for row in mutated}, fooled,
                     summary)
