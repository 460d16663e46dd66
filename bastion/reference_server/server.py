"""Reference Open Inference Protocol model server over onnxruntime, for demos and tests.

Serves every ``<models>/<name>/model.onnx`` as model ``name`` (version "1"), and every
``<models>/<name>/generator.json`` as a decoupled text-generation model (bastion/reference_server/
generation.py; the demo models' ``text-generator``). It is deliberately small: the real peers
(Triton, MLServer, KServe) are what production runs; this one exists so a demo and the
test-suite need nothing but this package.

ModelStreamInfer answers each request on its own. A request to an onnx model gets one response,
in request order. A request to a generation model is answered as Triton answers a decoupled
model, concurrently with the stream's other requests (so the chunks of several requests may
interleave): one response per text chunk (output ``text_output`` BYTES [1], parameter
``triton_final_response`` false), then an empty final response (no outputs, parameter
``triton_final_response`` true), all with the request's ``id`` and ``model_name``; with request
parameter ``stream: false`` one response with the whole text, flagged final. A refused request
gets an in-band ``error_message`` with its ``id``, model name and version in ``infer_response``
(after a generation has started, it ends the request in place of the final response).
"""
from __future__ import annotations

import asyncio
import json
import logging
import pathlib
from importlib import resources

import grpc
import numpy as np
import onnxruntime as ort

import bastion
from bastion.proxy.process import serve_until_stopped
from bastion.protos import codec, pb, pb_grpc
from bastion.reference_server.common import VERSION, InferError
from bastion.reference_server.generation import GENERATOR_FILE, GenerationModel

log = logging.getLogger("bastion.reference_server")

ORT_TO_V2 = {
    "tensor(float)": "FP32", "tensor(double)": "FP64", "tensor(float16)": "FP16",
    "tensor(int8)": "INT8", "tensor(int16)": "INT16", "tensor(int32)": "INT32",
    "tensor(int64)": "INT64", "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32", "tensor(uint64)": "UINT64", "tensor(bool)": "BOOL",
    "tensor(string)": "BYTES", "tensor(bfloat16)": "BF16",
}


def default_models_dir() -> pathlib.Path:
    return pathlib.Path(str(resources.files("bastion") / "demo_models"))


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


Model = OnnxModel | GenerationModel


def stream_error(request: pb.ModelInferRequest, message: str) -> pb.ModelStreamInferResponse:
    """An in-band error for one request of a stream, naming that request."""
    return pb.ModelStreamInferResponse(
        error_message=message,
        infer_response=pb.ModelInferResponse(model_name=request.model_name,
                                             model_version=request.model_version,
                                             id=request.id))


class ReferenceServer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, models: dict[str, Model], request_log: pathlib.Path | None = None):
        self.models = models
        self.request_log = request_log.open("a", buffering=1) if request_log else None

    def _model(self, name: str, version: str) -> Model:
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

    def _received(self, request: pb.ModelInferRequest) -> Model:
        if self.request_log is not None:
            self.request_log.write(json.dumps({"model": request.model_name, "id": request.id}) + "\n")
        return self._model(request.model_name, request.model_version)

    async def _infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        model = self._received(request)
        if isinstance(model, GenerationModel):
            job = model.parse(request)
            text = await asyncio.to_thread(model.text, job)
            return model.response(request, text, final=None)
        return await asyncio.to_thread(model.infer, request)

    async def ModelInfer(self, request, context):
        try:
            return await self._infer(request)
        except InferError as err:
            await context.abort(err.code, str(err))

    async def ModelStreamInfer(self, request_iterator, context):
        outbox: asyncio.Queue = asyncio.Queue()
        generations: set[asyncio.Task] = set()
        done = object()

        async def generate(model: GenerationModel, request: pb.ModelInferRequest, job) -> None:
            try:
                if not job.stream:
                    text = await asyncio.to_thread(model.text, job)
                    await outbox.put(pb.ModelStreamInferResponse(
                        infer_response=model.response(request, text, final=True)))
                    return
                chunks = model.chunks(job)
                while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
                    await outbox.put(pb.ModelStreamInferResponse(
                        infer_response=model.response(request, chunk, final=False)))
                await outbox.put(pb.ModelStreamInferResponse(
                    infer_response=model.response(request, None, final=True)))
            except InferError as err:
                await outbox.put(stream_error(request, str(err)))
            except Exception:  # noqa: BLE001 - one request must not end the stream
                log.exception("generation failed")
                await outbox.put(stream_error(request, f"model '{model.name}': internal error"))

        async def read() -> None:
            try:
                async for request in request_iterator:
                    try:
                        model = self._received(request)
                        if isinstance(model, GenerationModel):
                            task = asyncio.create_task(generate(model, request,
                                                                model.parse(request)))
                            generations.add(task)
                            task.add_done_callback(generations.discard)
                        else:
                            await outbox.put(pb.ModelStreamInferResponse(
                                infer_response=await asyncio.to_thread(model.infer, request)))
                    except InferError as err:
                        await outbox.put(stream_error(request, str(err)))
                while generations:
                    await asyncio.wait(set(generations))
            finally:
                await outbox.put(done)

        reader = asyncio.create_task(read())
        try:
            while (reply := await outbox.get()) is not done:
                yield reply
            await reader  # the client's stream errors, if any, end the call
        finally:
            for task in (reader, *generations):
                task.cancel()


def load_models(models_dir: pathlib.Path, threads: int = 1) -> dict[str, Model]:
    """``<name>/model.onnx`` (an onnx model) and ``<name>/generator.json`` (a text-generation
    model) under ``models_dir``, by name."""
    models: dict[str, Model] = {}
    for folder in sorted(p for p in models_dir.iterdir() if p.is_dir()):
        if (folder / "model.onnx").is_file():
            models[folder.name] = OnnxModel(folder.name, folder / "model.onnx", threads)
        elif (folder / GENERATOR_FILE).is_file():
            models[folder.name] = GenerationModel(folder.name, folder, threads)
    if not models:
        raise FileNotFoundError(f"no <name>/model.onnx or <name>/{GENERATOR_FILE} under "
                                f"{models_dir}")
    return models


async def serve(listen: str, models_dir: pathlib.Path, threads: int = 1,
                request_log: pathlib.Path | None = None) -> None:
    models = load_models(models_dir, threads)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 * 1024 * 1024),
                                      ("grpc.max_send_message_length", 64 * 1024 * 1024)])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(ReferenceServer(models, request_log), server)
    await serve_until_stopped(
        server, listen, lambda port: f"bastion upstream: serving grpc={port} "
                                     f"models={','.join(models)}", grace_s=2)
