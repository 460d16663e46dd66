"""A real gRPC server with scripted behaviour, for proving what the proxy forwards.

It answers methods no v2 server has (so they must go through the generic path), fails on purpose
with custom statuses and metadata, echoes streams, and records what each call received.
"""
from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc

from bastion.protos import SERVICE, pb

UNKNOWN_UNARY = "/custom.v1.Lab/Reverse"
UNKNOWN_STREAM = "/custom.v1.Lab/Echo"
REPO_LOAD = f"/{SERVICE}/RepositoryModelLoad"  # KServe/Triton message shape we do not define
FAIL = "/custom.v1.Lab/Fail"
SLOW = "/custom.v1.Lab/Slow"
MODEL_INFER = f"/{SERVICE}/ModelInfer"
MODEL_STREAM_INFER = f"/{SERVICE}/ModelStreamInfer"
FAIL_DETAILS = "scripted failure: quota \u2713 exceeded"
SILENT_MODEL = "silent"        # ModelStreamInfer: takes requests, never answers
DECOUPLED_MODEL = "decoupled"  # ModelStreamInfer: CHUNKS responses per request, CHUNK_GAP_S apart
CHUNKS, CHUNK_GAP_S = 5, 0.5


class ScriptedUpstream(grpc.GenericRpcHandler):
    def __init__(self):
        self.calls: list[dict] = []
        self.lock = threading.Lock()
        self.slow_cancelled = threading.Event()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        self.server.add_generic_rpc_handlers((self,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{self.port}"
        self.server.start()

    def stop(self) -> None:
        self.server.stop(0)

    def count(self, method: str) -> int:
        with self.lock:
            return sum(1 for c in self.calls if c["method"] == method)

    def last(self, method: str) -> dict:
        with self.lock:
            return [c for c in self.calls if c["method"] == method][-1]

    def _record(self, method: str, context, payload) -> None:
        with self.lock:
            self.calls.append({"method": method, "metadata": dict(context.invocation_metadata()),
                               "time_remaining": context.time_remaining(), "payload": payload})

    def service(self, details):
        method = details.method
        if method in (UNKNOWN_UNARY, REPO_LOAD):
            def reverse(request: bytes, context):
                self._record(method, context, request)
                context.send_initial_metadata((("x-initial", "from-upstream"),))
                context.set_trailing_metadata((("x-trailing", "t1"), ("x-blob-bin", b"\x00\xff")))
                return request[::-1] + b"!"
            return grpc.unary_unary_rpc_method_handler(reverse)
        if method == UNKNOWN_STREAM:
            def echo(request_iterator, context):
                self._record(method, context, None)
                for index, message in enumerate(request_iterator):
                    yield bytes([index]) + message
            return grpc.stream_stream_rpc_method_handler(echo)
        if method == FAIL:
            def fail(request: bytes, context):
                self._record(method, context, request)
                context.set_trailing_metadata((("x-error-id", "42"), ("x-why-bin", b"\x01\x02")))
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, FAIL_DETAILS)
            return grpc.unary_unary_rpc_method_handler(fail)
        if method == SLOW:
            def slow(request: bytes, context):
                self._record(method, context, request)
                for _ in range(200):
                    if not context.is_active():
                        self.slow_cancelled.set()
                        return b""
                    time.sleep(0.05)
                return b"late"
            return grpc.unary_unary_rpc_method_handler(slow)
        if method == f"/{SERVICE}/ServerReady":
            return grpc.unary_unary_rpc_method_handler(
                lambda request, context: pb.ServerReadyResponse(ready=True).SerializeToString())
        if method == MODEL_INFER:
            def infer(request: bytes, context):
                self._record(method, context, request)
                parsed = pb.ModelInferRequest.FromString(request)
                return pb.ModelInferResponse(model_name=parsed.model_name,
                                             id=parsed.id).SerializeToString()
            return grpc.unary_unary_rpc_method_handler(infer)
        if method == MODEL_STREAM_INFER:
            def stream_infer(request_iterator, context):
                for request in request_iterator:
                    self._record(method, context, request)
                    parsed = pb.ModelInferRequest.FromString(request)
                    if parsed.model_name == SILENT_MODEL:
                        continue  # takes the request, never answers it
                    # A decoupled model answers in several chunks, the last one flagged final.
                    chunks = CHUNKS if parsed.model_name == DECOUPLED_MODEL else 1
                    for index in range(chunks):
                        if index:
                            time.sleep(CHUNK_GAP_S)
                        response = pb.ModelInferResponse(model_name=parsed.model_name,
                                                         id=parsed.id)
                        if chunks > 1:
                            response.parameters["triton_final_response"].bool_param = (
                                index == chunks - 1)
                        yield pb.ModelStreamInferResponse(
                            infer_response=response).SerializeToString()
            return grpc.stream_stream_rpc_method_handler(stream_infer)
        return None
