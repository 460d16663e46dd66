"""Open Inference Protocol messages and stubs (generated; see GENERATED_BY)."""
from bastion.protos import grpc_predict_v2_pb2 as pb
from bastion.protos import grpc_predict_v2_pb2_grpc as pb_grpc

SERVICE = "inference.GRPCInferenceService"

__all__ = ["pb", "pb_grpc", "SERVICE"]
