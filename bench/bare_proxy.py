"""The floor any Python gRPC proxy pays: a minimal grpc.aio byte-forwarding proxy.

Benchmark fixture, not product code. One generic handler claims every method and forwards it as a
unary call of raw bytes (no serializers) over one channel to the upstream, passing the client's
metadata and the time left on its deadline; nothing else (no response metadata, no metrics, no
request ids, no inspection). An upstream error ends the client's call with the same code and
details.

    python bench/bare_proxy.py --listen 127.0.0.1:P --upstream 127.0.0.1:U

Prints ``bare_proxy: serving grpc=PORT upstream=...`` once it listens; stops on SIGTERM/SIGINT.
"""
from __future__ import annotations

import argparse
import asyncio

import grpc

from bastion.proxy.process import serve_until_stopped

MAX_MESSAGE = 64 * 1024 * 1024
# Keys grpc sets itself on the outgoing call (pseudo-headers, transport headers).
_SKIP = frozenset({"user-agent", "content-type", "te", "host", "grpc-timeout",
                   "grpc-encoding", "grpc-accept-encoding"})


class Forwarder(grpc.GenericRpcHandler):
    def __init__(self, channel: grpc.aio.Channel):
        self.channel = channel
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details):
        method = handler_call_details.method
        handler = self.handlers.get(method)
        if handler is None:
            upstream = self.channel.unary_unary(method)

            async def forward(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
                metadata = tuple((k, v) for k, v in context.invocation_metadata()
                                 if k not in _SKIP and not k.startswith(":"))
                try:
                    return await upstream(request, metadata=metadata,
                                          timeout=context.time_remaining())
                except grpc.aio.AioRpcError as error:
                    await context.abort(error.code(), error.details() or "")

            handler = self.handlers[method] = grpc.unary_unary_rpc_method_handler(forward)
        return handler


async def serve(listen: str, upstream: str) -> None:
    options = [("grpc.max_receive_message_length", MAX_MESSAGE),
               ("grpc.max_send_message_length", MAX_MESSAGE)]
    # Retries off, as Bastion's upstream channel has them: the retry filter buffers each call.
    channel = grpc.aio.insecure_channel(upstream, options=options + [("grpc.enable_retries", 0)])
    server = grpc.aio.server(options=options + [("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((Forwarder(channel),))
    await serve_until_stopped(
        server, listen, lambda port: f"bare_proxy: serving grpc={port} upstream={upstream}",
        grace_s=1)
    await channel.close()


def _run(coro) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT to serve on")
    parser.add_argument("--upstream", required=True, help="HOST:PORT to forward to")
    args = parser.parse_args()
    _run(serve(args.listen, args.upstream))


if __name__ == "__main__":
    main()
