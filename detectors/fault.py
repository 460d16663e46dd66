"""`debug.fault`: fault injection (after Envoy's fault filter) to rehearse on_error and budgets.

It fails or stalls on purpose, so operators can check in staging that a broken or slow stage
does what its `on_error` and `budget_ms` say before a real one does. Scores are always 0.
"""
from __future__ import annotations

import random
import time
from collections.abc import Sequence

import numpy as np
from pydantic import Field

from bastion.core.registry import StageOptions, register
from bastion.detectors.base import Detector
from bastion.transforms.base import NUMERIC_DATATYPES, TEXT_DATATYPES


class FaultOptions(StageOptions):
    error_rate: float = Field(0.0, ge=0, le=1)
    delay_ms: float = Field(0.0, ge=0)


class FaultInjector(Detector):
    accepts = NUMERIC_DATATYPES | TEXT_DATATYPES

    def __init__(self, error_rate: float, delay_ms: float):
        self.error_rate = error_rate
        self.delay_ms = delay_ms

    def score(self, batch: Sequence) -> np.ndarray:
        if self.delay_ms:
            time.sleep(self.delay_ms / 1000)  # runs in a worker thread (offload=True)
        if self.error_rate and random.random() < self.error_rate:
            raise RuntimeError("debug.fault: injected failure")
        return np.zeros(len(batch))


register("debug.fault", "detector", FaultOptions,
         lambda o: FaultInjector(o.error_rate, o.delay_ms), offload=True)
