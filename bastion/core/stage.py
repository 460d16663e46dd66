"""The one face of every stage: :class:`Stage`, with a request half and a response half.

Like an Envoy filter (decode and encode halves) or a Starlette middleware, every stage, whether
it rewrites inputs, scores them or reads the model's answer, is one :class:`Stage`:

* **what it accepts**: ``accepts``, the v2 datatypes of the inputs it works on (the chain hands
  it only those; config wiring it to another input is rejected);
* **the request half**: ``on_request(view) -> StageOutcome`` on the inputs it targets, before
  the request is forwarded (``aon_request`` when ``is_async``: a model scored through the
  micro-batcher, awaited on the event loop);
* **the response half**: ``prepare(request, inputs, request_id) -> state`` on the request about
  to be forwarded, then ``on_response(state, response, call_upstream) -> ResponseResult`` on the
  answer (stages registered with kind ``response`` run it; the chain runs them in reverse order).

**One score sense**: higher is more suspicious. A stage acts when ``score >= threshold`` (the
threshold lives in config, never in the stage, so one fitted stage serves monitor and enforce).
A transform's score is how many characters or elements it changed.

The convenience bases built on it (``Transform``/``TextTransform`` in transforms/base.py,
``Detector``/``TextDetector`` and ``ResponseStage`` in detectors/base.py) implement
``on_request`` from the narrower method their kind needs (``apply``, ``score``), so a new stage
writes only that. Stages that learn from benign data also inherit
:class:`bastion.core.learner.Learner`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np

__all__ = ["ResponseResult", "Stage", "StageOutcome", "StageView"]


@dataclasses.dataclass
class StageView:
    """What the request half of one stage sees: the inputs it targets, in order, by name
    (decoded ``str`` elements for text stages, arrays for tensor stages)."""
    request_id: str
    stage_id: str
    values: dict[str, np.ndarray]
    datatypes: dict[str, str]


@dataclasses.dataclass
class StageOutcome:
    """What the request half found: the stage's ``score`` (higher = more suspicious), short
    reason codes (never raw input), inputs to replace (transforms), and the text element that
    scored highest (the audit excerpt's candidate; never logged raw)."""
    score: float = 0.0
    reasons: list[str] = dataclasses.field(default_factory=list)
    replacements: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    worst_text: str | None = None


@dataclasses.dataclass
class ResponseResult:
    """What a stage's response half found in the upstream's answer."""
    score: float
    reasons: list[str] = dataclasses.field(default_factory=list)
    #: Extra response parameters to return (e.g. ``bastion.certified_radius``).
    parameters: dict[str, float | int | str | bool] = dataclasses.field(default_factory=dict)
    #: Refuse the answer regardless of thresholds: (gRPC status code name, reason code), e.g.
    #: randomized smoothing abstaining. In monitor mode this only annotates.
    refusal: tuple[str, str] | None = None
    #: Flag the answer with this reason code regardless of thresholds (forwarded, annotated).
    flag: str | None = None
    #: Extra work this answer cost the upstream (squeezed variants, noisy samples), for metrics.
    extra_items: int = 0


class Stage:
    """The one stage face (see the module docstring). Every half has a neutral default, so a
    stage overrides only the half it works in."""

    #: v2 datatypes of the inputs this stage works on.
    accepts: ClassVar[frozenset[str]] = frozenset()
    #: True when the request half awaits a model (``aon_request``) instead of computing inline.
    is_async: ClassVar[bool] = False
    #: Files the built stage read that its options do not name (a bundled model, the default
    #: rule file): the defense version (bastion/defense_version.py) hashes them with the files
    #: its options name. Set by the stage's build function.
    loaded_files: tuple = ()

    # -- request half --------------------------------------------------------------------------
    def on_request(self, view: StageView) -> StageOutcome:
        """Inspect (and, for a transform, rewrite) the targeted inputs before forwarding."""
        return StageOutcome()

    async def aon_request(self, view: StageView) -> StageOutcome:
        """The request half of an ``is_async`` stage; the default runs ``on_request``."""
        return self.on_request(view)

    # -- response half -------------------------------------------------------------------------
    def prepare(self, request, inputs: dict[str, np.ndarray], request_id: str) -> Any:
        """Modify ``request`` (a ModelInferRequest about to be forwarded) in place; return the
        state ``on_response`` needs. Free of per-call instance state."""
        return None

    async def on_response(self, state: Any, response, call_upstream) -> ResponseResult:
        """Score ``response`` (a ModelInferResponse, modified in place to what the client
        gets); ``await call_upstream(request)`` sends an extra request through the forwarding
        path."""
        return ResponseResult(0.0)

    def reasons(self, item: Any) -> list[str]:
        """Short reason codes for one scored item (e.g. ``signature:ignore_previous``)."""
        return []
