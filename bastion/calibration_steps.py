"""The steps both calibrate modes share (one stage, :mod:`bastion.calibrate`; a whole pipeline,
:mod:`bastion.calibrate_pipeline`): read benign records, run texts through stages as the sidecar
does, fit a learner, and write the threshold record. Kept apart so the whole-pipeline mode
need not import the module that dispatches to it (which was an import loop).
"""
from __future__ import annotations

import asyncio
import datetime
import gzip
import json
import pathlib
import sys

import numpy as np


def read_records(path: str, field: str = "text", label: str | None = "benign",
                 source_field: str = "source") -> tuple[list[str], list[str]]:
    """(texts, sources) of the benign records; a record without a source is ``unknown``."""
    opener = gzip.open if path.endswith(".gz") else open
    texts, sources = [], []
    with opener(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            record = json.loads(line)
            if label is not None and record.get("label", label) != label:
                continue
            texts.append(record[field])
            sources.append(str(record.get(source_field) or "unknown"))
    return texts, sources


def read_texts(path: str, field: str = "text", label: str | None = "benign") -> list[str]:
    return read_records(path, field, label)[0]


async def run_texts(pipeline, input_name: str, texts: list[str], concurrency: int = 32,
                    progress: bool = False, upto: int | None = None, kind: str | None = None
                    ) -> tuple[dict[str, np.ndarray], np.ndarray, list[str]]:
    """Each text through the model's chain as the sidecar runs it (``Pipeline.run_each``: the
    first ``upto`` request stages, only those of ``kind`` if given; none skipped after a
    block). Returns ({stage id: [n] scores, NaN where it did not score}, [n] the id of the
    stage that refused the text or None, the texts as the last stage left them)."""
    from bastion.proxy.pipeline import RequestContext
    from bastion.protos.codec import as_bytes_array

    scores = {runner.config.stage_id: np.full(len(texts), np.nan)
              for runner in pipeline.runners[:upto]}
    refused = np.full(len(texts), None, dtype=object)
    seen = list(texts)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(texts), unit="text", file=sys.stderr)

    async def one(i: int, text: str) -> None:
        ctx = RequestContext(f"calibrate-{i}", pipeline.model_name, "",
                             {input_name: as_bytes_array([text], (1, 1))}, {input_name: "BYTES"},
                             invalid_utf8="replace")
        refused[i] = await pipeline.run_each(ctx, upto, kind)
        for stage_id, score in ctx.scores.items():
            scores[stage_id][i] = score
        if refused[i] is None:
            seen[i] = str(ctx.texts(input_name).reshape(-1)[0])
        if bar is not None:
            bar.update(1)

    for start in range(0, len(texts), concurrency):
        await asyncio.gather(*(one(i, texts[i])
                               for i in range(start, min(start + concurrency, len(texts)))))
    if bar is not None:
        bar.close()
    return scores, refused, seen


def fit_learner(pipeline, index: int, input_name: str, texts: list[str]) -> str:
    """Fit request stage ``index`` on ``texts`` as it sees them in serving (after the
    transforms before it); save its state. Returns a note for the threshold file."""
    runner = pipeline.runners[index]
    _, refused, seen = asyncio.run(run_texts(pipeline, input_name, texts, upto=index,
                                             kind="transform"))
    seen = [text for text, why in zip(seen, refused) if why is None]
    detector = runner.config.impl
    detector.fit(seen)
    saved = detector.save()
    note = f"fitted on {len(seen)} texts" + (f", state saved to {saved}" if saved else "")
    print(f"bastion calibrate: {runner.config.stage_id} {note}", file=sys.stderr)
    return note


def default_threshold_file(args, runner) -> pathlib.Path:
    """Where a stage's threshold goes: its threshold_file, else the default file the stage
    would read (next to the config)."""
    from bastion.stage_config import DEFAULT_THRESHOLD_FILE
    if runner.config.common.threshold_file:
        return pathlib.Path(runner.config.common.threshold_file)
    return pathlib.Path(args.config).absolute().parent / DEFAULT_THRESHOLD_FILE.format(
        model=args.model, stage=runner.config.stage_id)


def threshold_record(args, stage_id: str, threshold: float, scores: np.ndarray,
                     fit_note: str) -> dict:
    """The threshold file's contents (scores: the stage's finite held-out benign scores)."""
    quantiles = [0.5, 0.9, 0.95, 0.99, 0.999]
    return {
        "threshold": threshold,
        "target_fpr": args.target_fpr,
        "observed_fpr": float(np.mean(scores >= threshold)),
        "model": args.model,
        "stage": stage_id,
        "data": str(args.data),
        "scored": int(len(scores)),
        "fit": fit_note,
        "quantiles": {f"p{q * 100:g}": float(v) for q, v in
                      zip(quantiles, np.quantile(scores, quantiles))},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
