"""Open Inference Protocol: messages and stubs (generated; see GENERATED_BY) and the tensor codec
(:mod:`bastion.protos.codec`). The bottom layer: it imports nothing else of Bastion's."""
from bastion.protos import grpc_predict_v2_pb2 as pb
from bastion.protos import grpc_predict_v2_pb2_grpc as pb_grpc

SERVICE = "inference.GRPCInferenceService"

__all__ = ["pb", "pb_grpc", "SERVICE"]
