"""The one `bastion` command: the sidecar and the tools around it (`bastion COMMAND --help`
shows one command's options)."""
from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import pathlib
import shlex
import sys

from bastion import __version__


# Sub-command modules (optional: a module that is absent simply adds no command).
COMMAND_MODULES = (
    "bastion.calibrate",      # bastion calibrate
    "bastion.replay",         # bastion replay
    "bastion.models",         # bastion models export ...
    "bastion.signature_library",  # bastion signatures add ...
)


def _run(coro) -> None:
    try:
        import uvloop
    except ImportError:  # uvloop is a dependency, but the proxy is correct without it
        asyncio.run(coro)
    else:
        uvloop.run(coro)


def limit_blas_threads() -> None:
    """One BLAS thread in the sidecar unless the operator set a count: detectors multiply small
    matrices per request, where a threaded OpenBLAS spends ~50x the CPU spinning its workers
    (measured: 7.7 ms vs 0.13 ms CPU for a 1 x 48 by 48 x 20000 product on 2 cores). ONNX
    Runtime has its own thread pools and is not affected."""
    if any(os.environ.get(v) for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                        "MKL_NUM_THREADS")):
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # comes with scikit-learn; without it BLAS keeps its default
        return
    threadpool_limits(1, user_api="blas")


def _cmd_serve(args: argparse.Namespace) -> int:
    from bastion.config import Config, ConfigError, load_config, with_overrides
    from bastion.proxy.server import serve
    limit_blas_threads()
    try:
        config = load_config(args.config) if args.config else Config()
        config = with_overrides(config, listen=args.listen, admin=args.admin,
                                upstream=args.upstream, http_listen=args.http_listen)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    _run(serve(config, pathlib.Path(args.config) if args.config else None))
    # Stopped, files closed: skip the interpreter's own teardown (collecting every loaded
    # module, seconds on a busy machine), which would push the exit past the
    # drain + grace + 2 s that SIGTERM promises.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _cmd_check_config(args: argparse.Namespace) -> int:
    from bastion.config import ConfigError, load_config
    try:
        config = load_config(args.config)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 1
    models = ", ".join(f"{name} ({m.mode}, {len(m.pipeline)} stages)"
                       for name, m in config.models.items()) or "none (pass-through)"
    print(f"{args.config}: OK; upstream {config.upstream.target}; models: {models}")
    from bastion.defense_version import defense_version
    version = defense_version(config)
    print(f"defense version: {version.digest} (config and {len(version.files)} files"
          f"{': ' if args.files else ''}{', '.join(sorted(version.files)) if args.files else ''})")
    return 0


def _cmd_upstream(args: argparse.Namespace) -> int:
    from bastion.reference_server.server import default_models_dir, serve
    models_dir = pathlib.Path(args.models) if args.models else default_models_dir()
    _run(serve(args.listen, models_dir, args.threads,
               pathlib.Path(args.request_log) if args.request_log else None))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from bastion.demo import run_demo
    return run_demo(duration_s=args.duration, rate=args.rate, data=args.data)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bastion", description=__doc__)
    parser.add_argument("--version", action="version", version=f"bastion {__version__}")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the sidecar")
    serve.add_argument("-c", "--config", help="YAML config file (none: pass-through)")
    serve.add_argument("--listen", help="gRPC HOST:PORT (overrides the file)")
    serve.add_argument("--upstream", help="model server HOST:PORT (overrides the file)")
    serve.add_argument("--admin", help="admin HTTP HOST:PORT (overrides the file)")
    serve.add_argument("--http-listen", help="KServe v2 REST front HOST:PORT, e.g. 0.0.0.0:8000 "
                                             "(overrides the file; unset: gRPC only)")
    serve.set_defaults(func=_cmd_serve)

    check = sub.add_parser("check-config", help="validate a config file")
    check.add_argument("config")
    check.add_argument("--files", action="store_true",
                       help="list the files the defense version covers")
    check.set_defaults(func=_cmd_check_config)

    upstream = sub.add_parser("upstream", help="reference v2 model server (onnxruntime)")
    upstream.add_argument("--listen", default="127.0.0.1:9001")
    upstream.add_argument("--models", help="folder of <name>/model.onnx and <name>/generator.json "
                          "(default: demo models)")
    upstream.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    upstream.add_argument("--request-log", help="append one JSON line per inference request")
    upstream.set_defaults(func=_cmd_upstream)

    demo = sub.add_parser("demo", help="upstream + sidecar + benign and malformed traffic")
    demo.add_argument("--duration", type=float, default=None,
                      help="seconds to run (default: until Ctrl-C)")
    demo.add_argument("--rate", type=float, default=50.0, help="requests per second")
    demo.add_argument("--data", help="labelled .jsonl[.gz] prompts for the text model "
                                     "(default: the bundled sample)")
    demo.set_defaults(func=_cmd_demo)

    # Tools that live in their own modules add their own sub-commands: each module exposes
    # `add_parser(subparsers)`, which sets `func` on its parser.
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    #: The command as typed (recorded by commands that write files, e.g. calibrate).
    args.command_line = "bastion " + shlex.join(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)
