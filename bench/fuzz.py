"""Fuzz the sidecar at volume, and its tensor codec in-process.

    python bench/fuzz.py [--cases 100000] [--codec-cases 200000] [--atheris-runs 200000]

1. Sidecar (``--cases``): the strategies of tests/test_fuzz.py (malformed ModelInferRequests,
   raw and damaged bytes to ModelInfer, random bytes to other and unknown methods, streams of
   all of them) against `bastion serve` with the demo pipelines in front of `bastion upstream`.
   Every case is judged by the same oracles as the tests; the sidecar must stay alive. Prints a
   histogram of statuses per kind, the known bugs hit, and any new problem with a reproducer.
2. Codec (``--codec-cases``): ``bastion.protos.codec.decode_request`` on ModelInferRequests
   parsed from random bytes, damaged real requests and generated ones: only TensorError (or
   protobuf's DecodeError when parsing) may escape. Exceptions are counted by type.
3. atheris (``--atheris-runs``, if `pip install atheris` worked): coverage-guided fuzzing of the
   same codec entry point, seeded with real requests; known bugs are counted and skipped so the
   run keeps exploring. 0 skips it.

Exits non-zero if the sidecar died, or any problem that is not a listed known bug was found.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import random
import re
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from google.protobuf.message import DecodeError  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from bastion.protos import codec, pb  # noqa: E402
from tests import test_fuzz as tf  # noqa: E402


def _settings(cases: int, seed: int):
    return settings(max_examples=cases, deadline=None, database=None, phases=[Phase.generate],
                    derandomize=False, print_blob=False,
                    suppress_health_check=list(HealthCheck))


class Report:
    def __init__(self):
        self.statuses: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.known = collections.Counter()
        self.problems: list[dict] = []
        self.cases = 0
        self.crashed = False
        self.started = time.monotonic()

    def add(self, kind: str, result, reproducer) -> None:
        code, details, problem = result
        self.cases += 1
        self.statuses[kind][code.name] += 1
        if problem is None:
            return
        if problem.startswith("known:"):
            self.known[problem[6:]] += 1
        elif len(self.problems) < 50:
            self.problems.append({"kind": kind, "problem": problem, "reproducer": reproducer()})

    def progress(self, every: int = 5000) -> None:
        if self.cases % every == 0:
            rate = self.cases / max(time.monotonic() - self.started, 1e-9)
            print(f"  {self.cases} cases ({rate:.0f}/s), new problems {len(self.problems)}, "
                  f"known {dict(self.known)}", flush=True)


def fuzz_sidecar(total: int, seed: int) -> Report:
    report = Report()
    print(f"sidecar fuzzing: {total} cases; starting `bastion upstream` + `bastion serve` "
          f"(demo pipelines)", flush=True)
    target = tf.Target()
    shares = {"infer_request": 0.45, "raw_infer": 0.25, "generic": 0.15, "generic_stream": 0.05,
              "stream": 0.1}
    try:
        def alive_or_stop() -> None:
            if not target.alive():
                report.crashed = True
                raise SystemExit("the sidecar died:\n" + target.sidecar.proc.output()[-3000:])

        @_settings(int(total * shares["infer_request"]), seed)
        @given(request=tf.infer_requests())
        def infer_requests(request):
            payload = request.SerializeToString()
            report.add("ModelInfer (generated)", target.infer(payload), lambda: payload.hex())
            alive_or_stop()
            report.progress()

        @_settings(int(total * shares["raw_infer"]), seed)
        @given(payload=st.one_of(st.binary(max_size=4096), tf.mutated_payloads()))
        def raw_infer(payload):
            report.add("ModelInfer (raw bytes)", target.infer(payload), lambda: payload.hex())
            alive_or_stop()
            report.progress()

        @_settings(int(total * shares["generic"]), seed)
        @given(method=tf.generic_methods, payload=st.binary(max_size=1024))
        def generic(method, payload):
            report.add("other methods", target.generic(method, payload),
                       lambda: {"method": method, "payload": payload.hex()})
            alive_or_stop()
            report.progress()

        @_settings(int(total * shares["generic_stream"]), seed)
        @given(method=tf.generic_methods,
               payloads=st.lists(st.binary(max_size=256), min_size=1, max_size=3))
        def generic_streams(method, payloads):
            report.add("other methods, streams", target.generic_stream(method, payloads),
                       lambda: {"method": method, "payloads": [p.hex() for p in payloads]})
            alive_or_stop()
            report.progress()

        @_settings(int(total * shares["stream"]), seed)
        @given(payloads=st.lists(tf.model_infer_payloads, min_size=1, max_size=5))
        def streams(payloads):
            report.add("ModelStreamInfer", target.stream(payloads),
                       lambda: [p.hex() for p in payloads])
            alive_or_stop()
            report.progress()

        for phase in (infer_requests, raw_infer, generic, generic_streams, streams):
            phase_started = time.monotonic()
            before = report.cases
            phase()
            print(f"  {phase.__name__}: {report.cases - before} cases in "
                  f"{time.monotonic() - phase_started:.0f}s", flush=True)
        target.healthy()
    finally:
        code = target.close()
        if code != 0:
            report.problems.append({"kind": "shutdown", "problem": f"sidecar exit code {code}",
                                    "reproducer": ""})
    return report


def codec_outcome(payload: bytes) -> str:
    try:
        request = pb.ModelInferRequest.FromString(payload)
    except DecodeError:
        return "DecodeError (not a message)"
    try:
        codec.decode_request(request, tf.MAX_TENSOR_ELEMENTS)
    except codec.TensorError:
        return "TensorError"
    except Exception as err:  # noqa: BLE001 - what we are looking for
        # Group by exception type and message with numbers blanked out.
        message = re.sub(r"\d+", "N", str(err))[:90]
        return f"ESCAPED {type(err).__name__}: {message}"
    return "decoded"


def _mutate(rng: random.Random, payload: bytes, seeds: list[bytes]) -> bytes:
    data = bytearray(payload)
    for _ in range(rng.choice((1, 1, 1, 2, 2, 4, 8))):
        op = rng.randrange(6)
        at = rng.randrange(len(data) + 1)
        if op == 0 and data:
            data[min(at, len(data) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            del data[at:]
        elif op == 2:
            data[at:at] = rng.randbytes(rng.randint(1, 8))
        elif op == 3:
            del data[at:at + rng.randint(1, 16)]
        elif op == 4:   # splice in a piece of another request
            other = rng.choice(seeds)
            cut = rng.randrange(len(other) + 1)
            data[at:at] = other[cut:cut + rng.randint(1, 64)]
        elif data:      # an interesting varint (huge or negative dims, lengths)
            data[min(at, len(data) - 1):min(at, len(data) - 1) + 1] = rng.choice(
                [b"\xff" * 8 + b"\x7f", b"\xff" * 9 + b"\x01", b"\x80\x80\x80\x80\x08", b"\x00"])
    return bytes(data)


def fuzz_codec(total: int, seed: int, generated: int) -> tuple[collections.Counter, dict]:
    """``generated`` cases from the hypothesis strategies (which also become seeds), then
    ``total`` cheap random mutations of the seeds (and pure random bytes)."""
    print(f"codec fuzzing in-process: {generated} generated + {total} mutated cases", flush=True)
    outcomes: collections.Counter = collections.Counter()
    examples: dict[str, str] = {}
    seeds = [r.payload for r in __import__("bastion.traffic").traffic.labelled_records()]
    started = time.monotonic()

    def record(payload: bytes) -> None:
        outcome = codec_outcome(payload)
        outcomes[outcome] += 1
        if outcome.startswith("ESCAPED") and outcome not in examples:
            examples[outcome] = payload.hex()[:400]

    @_settings(generated, seed)
    @given(payload=st.one_of(st.binary(max_size=2048), tf.mutated_payloads(),
                             tf.infer_requests().map(lambda r: r.SerializeToString())))
    def run(payload):
        record(payload)
        if len(seeds) < 5000 and len(payload) < 65536:
            seeds.append(payload)

    if generated:
        run()
    rng = random.Random(seed)
    for index in range(total):
        if index % 10 == 0:
            record(rng.randbytes(rng.randint(0, 256)))
        else:
            record(_mutate(rng, rng.choice(seeds), seeds))
    print(f"  {sum(outcomes.values())} cases in {time.monotonic() - started:.0f}s", flush=True)
    return outcomes, examples


# Messages of the reported codec bug (tests/test_fuzz.py KNOWN_BUGS["codec-valueerror"]).
KNOWN_CODEC_MESSAGES = ("array is too big", "maximum supported dimension")

ATHERIS_CHILD = r'''
import sys, collections
import atheris
with atheris.instrument_imports():
    from google.protobuf.message import DecodeError
    from bastion.protos import pb
    from bastion.protos import codec

KNOWN = ("array is too big", "maximum supported dimension")
counts = collections.Counter()

def decode(data: bytes) -> str:
    try:
        request = pb.ModelInferRequest.FromString(data)
    except DecodeError:
        return "DecodeError"
    try:
        codec.decode_request(request, 64 * 1024 * 1024)
        return "decoded"
    except codec.TensorError:
        return "TensorError"
    except ValueError as err:
        if any(k in str(err) for k in KNOWN):   # reported: codec-valueerror
            return "known:codec-valueerror"
        raise

def one(data: bytes) -> None:
    counts[decode(data)] += 1
    total = sum(counts.values())
    if total % 20000 == 0:
        print("atheris-counts", total, dict(counts), flush=True)

atheris.Setup(sys.argv, one)
atheris.Fuzz()
'''


def run_atheris(runs: int) -> dict:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return {"available": False}
    from bastion import traffic
    corpus = pathlib.Path(tempfile.mkdtemp(prefix="bastion-atheris-"))
    for index, record in enumerate(traffic.labelled_records()[::8]):
        (corpus / f"seed{index}").write_bytes(record.payload)
    script = corpus.parent / f"{corpus.name}-child.py"
    script.write_text(ATHERIS_CHILD)
    print(f"atheris: {runs} runs, corpus {corpus}", flush=True)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(script), f"-runs={runs}", "-max_len=8192",
                           "-rss_limit_mb=4096", str(corpus)],
                          capture_output=True, text=True, cwd=str(REPO), timeout=3600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    output = proc.stdout + proc.stderr
    counts = [line for line in output.splitlines() if line.startswith("atheris-counts")]
    crashed = "Uncaught Python exception" in output or proc.returncode not in (0,)
    summary = {"available": True, "runs": runs, "exit_code": proc.returncode,
               "seconds": round(time.monotonic() - started), "crash": crashed,
               "last_counts": counts[-1] if counts else "",
               "coverage": next((line for line in reversed(output.splitlines())
                                 if "cov:" in line), "")}
    if crashed:
        summary["output_tail"] = output[-3000:]
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=100_000, help="cases against the sidecar")
    parser.add_argument("--codec-cases", type=int, default=1_000_000,
                        help="random mutations decoded in-process")
    parser.add_argument("--codec-generated", type=int, default=10_000,
                        help="hypothesis-generated cases decoded in-process (also seeds)")
    parser.add_argument("--atheris-runs", type=int, default=200_000, help="0 skips atheris")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    results: dict = {}
    failed = False
    if args.cases:
        report = fuzz_sidecar(args.cases, args.seed)
        elapsed = time.monotonic() - report.started
        print(f"\n## Sidecar: {report.cases} cases in {elapsed:.0f}s "
              f"({report.cases / max(elapsed, 1e-9):.0f}/s)\n")
        codes = sorted({c for counter in report.statuses.values() for c in counter})
        print("| kind | cases | " + " | ".join(codes) + " |")
        print("|---|---:|" + "---:|" * len(codes))
        for kind, counter in report.statuses.items():
            print(f"| {kind} | {sum(counter.values())} | "
                  + " | ".join(str(counter[c]) for c in codes) + " |")
        print(f"\nsidecar crashed: {'YES' if report.crashed else 'no'}")
        print(f"known bugs hit: {dict(report.known) or 'none'}")
        for key in report.known:
            print(f"  {key}: {tf.KNOWN_BUGS.get(key, key)}")
        print(f"new problems: {len(report.problems)}")
        for problem in report.problems[:10]:
            print(f"  - {problem['kind']}: {problem['problem']}\n    reproducer: "
                  f"{json.dumps(problem['reproducer'])[:600]}")
        failed |= report.crashed or bool(report.problems)
        results["sidecar"] = {"cases": report.cases, "seconds": round(elapsed),
                              "statuses": {k: dict(v) for k, v in report.statuses.items()},
                              "known": dict(report.known), "problems": report.problems,
                              "crashed": report.crashed}
    if args.codec_cases:
        outcomes, examples = fuzz_codec(args.codec_cases, args.seed, args.codec_generated)
        print(f"\n## Codec in-process: {sum(outcomes.values())} cases\n")
        print("| outcome | cases |\n|---|---:|")
        for outcome, count in outcomes.most_common():
            print(f"| {outcome} | {count} |")
        for outcome, example in examples.items():
            print(f"reproducer for {outcome!r}: ModelInferRequest bytes (hex) {example}")
        escaped = {k: v for k, v in outcomes.items() if k.startswith("ESCAPED")}
        unknown = {k: v for k, v in escaped.items()
                   if not any(known in k for known in KNOWN_CODEC_MESSAGES)}
        failed |= bool(unknown)
        results["codec"] = {"outcomes": dict(outcomes), "examples": examples}
    if args.atheris_runs:
        summary = run_atheris(args.atheris_runs)
        print(f"\n## atheris\n\n{json.dumps(summary, indent=2)}")
        failed |= bool(summary.get("crash"))
        results["atheris"] = summary
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"\nfuzz: {'FAILED' if failed else 'OK'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
