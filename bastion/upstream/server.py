"""Reference Open Inference Protocol model server over onnxruntime, for demos and tests.

Serves every ``<models>/<name>/model.onnx`` as model ``name`` (version "1"). It is deliberately
small: the real peers (Triton, MLServer, KServe) are what production runs; this one exists so a
demo and the test-suite need nothing but this package.
"""
from __future__ import annotations

import asyncio
import json
import logging
import pathlib
import signal
from importlib import resources

import grpc
import numpy as np
import onnxruntime as ort

import bastion
from bastion.protos import codec, pb, pb_grpc

log = logging.getLogger("bastion.upstream")

ORT_TO_V2 = {
    "tensor(float)": "FP32", "tensor(double)": "FP64", "tensor(float16)": "FP16",
    "tensor(int8)": "INT8", "tensor(int16)": "INT16", "tensor(int32)": "INT32",
    "tensor(int64)": "INT64", "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32", "tensor(uint64)": "UINT64", "tensor(bool)": "BOOL",
    "tensor(string)": "BYTES", "tensor(bfloat16)": "BF16",
}
VERSION = "1"


def default_models_dir() -> pathlib.Path:
    return pathlib.Path(str(resources.files("bastion") / "demo_models"))


class InferError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class OnnxModel:
    def __init__(self, name: str, path: pathlib.Path, threads: int = 1):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.name = name
        self.session = ort.InferenceSession(str(path), options,
                                            providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]

    def metadata(self) -> pb.ModelMetadataResponse:
        reply = pb.ModelMetadataResponse(name=self.name, versions=[VERSION], platform="onnxruntime_onnx")
        for source, target in ((self.session.get_inputs(), reply.inputs),
                               (self.session.get_outputs(), reply.outputs)):
            for item in source:
                shape = [d if isinstance(d, int) else -1 for d in item.shape]
                target.add(name=item.name, datatype=ORT_TO_V2.get(item.type, item.type), shape=shape)
        return reply

    def infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        try:
            arrays = codec.decode_request(request)
        except codec.TensorError as err:
            raise InferError(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None
        feeds = {}
        for name, meta in self.inputs.items():
            if name not in arrays:
                raise InferError(grpc.StatusCode.INVALID_ARGUMENT,
                                 f"model '{self.name}' expects input '{name}'")
            array = arrays[name]
            expected = ORT_TO_V2.get(meta.type)
            got = next(t.datatype for t in request.inputs if t.name == name)
            if expected != got:
                raise InferError(grpc.StatusCode.INVALID_ARGUMENT,
                                 f"input '{name}': expected datatype {expected}, got {got}")
            if expected == "BYTES":
                try:
                    array = np.vectorize(lambda b: b.decode("utf-8"), otypes=[object])(array)
                except UnicodeDecodeError:
                    raise InferError(grpc.StatusCode.INVALID_ARGUMENT,
                                     f"input '{name}': not valid UTF-8") from None
            feeds[name] = array
        extra = set(arrays) - set(self.inputs)
        if extra:
            raise InferError(grpc.StatusCode.INVALID_ARGUMENT,
                             f"model '{self.name}' has no input '{sorted(extra)[0]}'")
        wanted = [o.name for o in request.outputs] or self.outputs
        unknown = [o for o in wanted if o not in self.outputs]
        if unknown:
            raise InferError(grpc.StatusCode.INVALID_ARGUMENT,
                             f"model '{self.name}' has no output '{unknown[0]}'")
        try:
            results = self.session.run(wanted, feeds)
        except (ort.capi.onnxruntime_pybind11_state.InvalidArgument,
                ort.capi.onnxruntime_pybind11_state.Fail) as err:
            raise InferError(grpc.StatusCode.INVALID_ARGUMENT,
                             f"model '{self.name}': {str(err).splitlines()[0][:300]}") from None
        reply = pb.ModelInferResponse(model_name=self.name, model_version=VERSION, id=request.id)
        outputs, datatypes = {}, {}
        for name, value in zip(wanted, results):
            value = np.asarray(value)
            if value.dtype.kind in "OU":
                datatypes[name] = "BYTES"
                value = codec.as_bytes_array([str(v) for v in value.reshape(-1)], value.shape)
            outputs[name] = value
        codec.encode_response(reply, outputs, datatypes)
        return reply


class ReferenceServer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, models: dict[str, OnnxModel], request_log: pathlib.Path | None = None):
        self.models = models
        self.request_log = request_log.open("a", buffering=1) if request_log else None

    def _model(self, name: str, version: str) -> OnnxModel:
        model = self.models.get(name)
        if model is None or version not in ("", VERSION):
            raise InferError(grpc.StatusCode.NOT_FOUND,
                             f"Request for unknown model: '{name}' version '{version}' is not found")
        return model

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=request.name in self.models
                                     and request.version in ("", VERSION))

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="bastion-reference-upstream",
                                         version=bastion.__version__, extensions=[])

    async def ModelMetadata(self, request, context):
        try:
            return self._model(request.name, request.version).metadata()
        except InferError as err:
            await context.abort(err.code, str(err))

    async def _infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        if self.request_log is not None:
            self.request_log.write(json.dumps({"model": request.model_name, "id": request.id}) + "\n")
        model = self._model(request.model_name, request.model_version)
        return await asyncio.to_thread(model.infer, request)

    async def ModelInfer(self, request, context):
        try:
            return await self._infer(request)
        except InferError as err:
            await context.abort(err.code, str(err))

    async def ModelStreamInfer(self, request_iterator, context):
        async for request in request_iterator:
            try:
                yield pb.ModelStreamInferResponse(infer_response=await self._infer(request))
            except InferError as err:
                yield pb.ModelStreamInferResponse(error_message=str(err))


def load_models(models_dir: pathlib.Path, threads: int = 1) -> dict[str, OnnxModel]:
    models = {}
    for path in sorted(models_dir.glob("*/model.onnx")):
        models[path.parent.name] = OnnxModel(path.parent.name, path, threads)
    if not models:
        raise FileNotFoundError(f"no <name>/model.onnx under {models_dir}")
    return models


async def serve(listen: str, models_dir: pathlib.Path, threads: int = 1,
                request_log: pathlib.Path | None = None) -> None:
    models = load_models(models_dir, threads)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 * 1024 * 1024),
                                      ("grpc.max_send_message_length", 64 * 1024 * 1024)])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(ReferenceServer(models, request_log), server)
    port = server.add_insecure_port(listen)
    if not port:
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    print(f"bastion upstream: serving grpc={port} models={','.join(models)}", flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    await server.stop(2)
