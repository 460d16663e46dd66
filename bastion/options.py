"""Command-line options from typed defaults: the tools' and benches' long lists of numeric
settings, declared once as keyword defaults instead of one ``add_argument`` call each."""
from __future__ import annotations

import argparse
import pathlib


def add_options(parser: argparse.ArgumentParser, **defaults) -> argparse.ArgumentParser:
    """One ``--name`` option per keyword (underscores become dashes). The option takes the
    default's type: a list takes one or more values of its items' type, ``False`` is a flag,
    ``None`` takes a string, a ``pathlib.Path`` a path. Options that need help text are added
    the usual way."""
    for name, default in defaults.items():
        flag = "--" + name.replace("_", "-")
        if default is False:
            parser.add_argument(flag, action="store_true")
        elif default is None:
            parser.add_argument(flag)
        elif isinstance(default, list):
            parser.add_argument(flag, type=type(default[0]), nargs="+", default=default)
        elif isinstance(default, pathlib.PurePath):
            parser.add_argument(flag, type=pathlib.Path, default=default)
        else:
            parser.add_argument(flag, type=type(default), default=default)
    return parser
