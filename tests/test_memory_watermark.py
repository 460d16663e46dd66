"""The memory watermark (limits.max_memory_bytes): above it new inference work is shed with
RESOURCE_EXHAUSTED, counted, and never reaches the model; below it nothing changes."""
from __future__ import annotations

import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as tc

from bastion.proxy.memory import CACHE_S, MemoryWatermark, resident_bytes
from tests.harness import Sidecar, Upstream


def test_resident_bytes_reads_this_process():
    assert resident_bytes() > 10 * 1024 * 1024  # a Python process with numpy loaded


def test_watermark_compares_cached_rss_with_the_limit():
    reads, now = [], [0.0]

    def read():
        reads.append(1)
        return 500

    mark = MemoryWatermark(None, read=read, clock=lambda: now[0])
    assert not mark.over() and not reads  # no limit: never reads, never over
    mark.limit_bytes = 400
    assert mark.over() and len(reads) == 1
    assert mark.over() and len(reads) == 1  # cached within CACHE_S
    now[0] += CACHE_S
    mark.limit_bytes = 600
    assert not mark.over() and len(reads) == 2
    assert "limits.max_memory_bytes" in mark.describe()


def _infer(address: str):
    client = tc.InferenceServerClient(address)
    data = tc.InferInput("prompt", [1, 1], "BYTES")
    data.set_data_from_numpy(np.array([[b"What is the capital of France?"]], dtype=object))
    return client.infer("text-classifier", [data])


@pytest.mark.parametrize("limit, shed", [(1024 * 1024, True), (None, False)])
def test_sidecar_sheds_new_work_above_the_watermark(tmp_path, limit, shed):
    upstream = Upstream(request_log=tmp_path / "requests.log")
    limits = f"limits: {{max_memory_bytes: {limit}}}\n" if limit else ""
    try:
        sidecar = Sidecar(upstream.address, limits + "models: {text-classifier: {}}\n")
        try:
            if not shed:
                assert _infer(sidecar.address).get_response().outputs
                return
            with pytest.raises(tc.InferenceServerException) as err:
                _infer(sidecar.address)
            assert err.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
            assert "memory above the watermark" in err.value.message()
            assert upstream.requests_seen() == 0  # the model never saw it
            metrics = urllib.request.urlopen(f"http://{sidecar.admin}/metrics").read().decode()
            assert ('bastion_shed_requests_total{model="text-classifier",stage="memory"} 1.0'
                    in metrics)
        finally:
            sidecar.stop()
    finally:
        upstream.stop()
