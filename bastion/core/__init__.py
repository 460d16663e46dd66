"""The stage core: what every stage builds on (the one :class:`~bastion.core.stage.Stage` face,
the registry, the Learner base), below transforms and detectors.

Layers point down (docs/architecture.md, "Layers"): the protocol (:mod:`bastion.protos`) <- this
core <- transforms, detectors <- config <- proxy <- CLI. Nothing here imports a stage, the config
or the server, so a stage (built in or from another package) registers without loading them.
"""
