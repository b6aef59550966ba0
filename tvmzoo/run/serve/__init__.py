"""`tvmzoo serve`: compiled models over the Open Inference Protocol (KServe v2), HTTP/REST and gRPC,
so Triton's clients (tritonclient, perf_analyzer) work unchanged.

repository  model folders -> loaded, checked models (ready or not, and why)
tensors     protocol tensors <-> numpy, datatypes, Triton's BYTES encoding, errors with their status
inference   one request: validate, decode images, batch, outputs and the classification extension
batcher     dynamic batching over model instances
native      the same batching in C++ (--native): engine.cc, built at first use, and NativeBatcher over it
metrics     Prometheus metrics named like Triton's
http_app    the HTTP/REST endpoints, with Triton's binary tensor extension
http_server HTTP/1.1 connections (asyncio + httptools): keep-alive, pipelining, 100-continue, limits
grpc_service the gRPC GRPCInferenceService (stubs from tritonclient's generated protobuf)
server      configuration, start, SIGTERM drain
"""
