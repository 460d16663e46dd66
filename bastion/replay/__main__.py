"""``python -m bastion.replay``: the command without the rest of the CLI."""
from bastion.replay.command import main

if __name__ == "__main__":
    raise SystemExit(main())
