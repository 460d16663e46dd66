"""What the reference server's model kinds share: the served version and the per-request error."""
from __future__ import annotations

import grpc

#: The one version every model is served as.
VERSION = "1"


class InferError(Exception):
    """A request the reference server refuses: a gRPC status code and a message that names the
    problem (an input, a parameter, a shape), never the request's data."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
