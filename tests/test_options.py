"""bastion.options.add_options: typed options from keyword defaults."""
from __future__ import annotations

import argparse
import pathlib

import pytest

from bastion.options import add_options


def test_options_take_the_defaults_types():
    parser = add_options(argparse.ArgumentParser(), epochs=10, lr=5e-4, out=pathlib.Path("x"),
                         sigmas=[0.25, 0.5], name=None, dry_run=False, label="a")
    defaults = parser.parse_args([])
    assert (defaults.epochs, defaults.lr, defaults.sigmas, defaults.name, defaults.dry_run,
            defaults.label) == (10, 5e-4, [0.25, 0.5], None, False, "a")
    args = parser.parse_args(["--epochs", "3", "--lr", "1", "--out", "y/z", "--sigmas", "1",
                              "2", "3", "--name", "n", "--dry-run"])
    assert args.epochs == 3 and isinstance(args.epochs, int)
    assert args.lr == 1.0 and isinstance(args.lr, float)
    assert args.out == pathlib.Path("y/z") and args.sigmas == [1.0, 2.0, 3.0]
    assert args.name == "n" and args.dry_run is True
    with pytest.raises(SystemExit):
        parser.parse_args(["--epochs", "1.5"])
