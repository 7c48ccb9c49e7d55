"""A third-party gRPC client's view of a Signpost node: the standard health checking protocol
and server reflection, over mutual TLS, with Python's grpcio (not our Rust stack).

Prints one JSON object: the health status of each service asked for, the services reflection
lists (v1 and v1alpha), and whether reflection can describe a Signpost symbol. Exits non-zero
only if it cannot talk to the node at all; the test judges the answers.
"""

import argparse
import json
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc


def reflect(channel, method, request):
    """One request on a reflection stream (v1 and v1alpha share the message layout)."""
    call = channel.stream_stream(
        method,
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    return next(iter(call(iter([request]), timeout=5)))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--addr", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--service", action="append", default=[])
    args = parser.parse_args()

    with open(args.ca, "rb") as f:
        ca = f.read()
    with open(args.cert, "rb") as f:
        cert = f.read()
    with open(args.key, "rb") as f:
        key = f.read()
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )
    out = {"health": {}, "reflection": {}}
    with grpc.secure_channel(args.addr, credentials) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in args.service:
            try:
                reply = health.Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=5
                )
                out["health"][service] = health_pb2.HealthCheckResponse.ServingStatus.Name(
                    reply.status
                )
            except grpc.RpcError as e:
                out["health"][service] = "error: " + e.code().name

        list_request = reflection_pb2.ServerReflectionRequest(list_services="")
        for version, method in [
            ("v1", "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            ("v1alpha", "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"),
        ]:
            try:
                reply = reflect(channel, method, list_request)
                out["reflection"][version] = sorted(
                    s.name for s in reply.list_services_response.service
                )
            except grpc.RpcError as e:
                out["reflection"][version] = "error: " + e.code().name

        # The generated stub as a grpcurl-like tool would use it: describe a message.
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(
            iter(
                [
                    reflection_pb2.ServerReflectionRequest(
                        file_containing_symbol="signpost.v1.Registry"
                    )
                ]
            ),
            timeout=5,
        )
        reply = next(iter(replies))
        out["describes_registry"] = (
            len(reply.file_descriptor_response.file_descriptor_proto) > 0
        )
    print(json.dumps(out, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
