"""The stage registry's old address, kept only for scripts that still import it from here
(tools/eval_prompt_guard.py). The registry lives in the stage core (:mod:`bastion.core.registry`)
and the full set of stages in :mod:`bastion.stage_catalog`; nothing in the package imports this.
"""
from bastion.stage_catalog import registry

__all__ = ["registry"]
