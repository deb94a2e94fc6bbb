"""Asks a fleetbench coordinator's standard gRPC services with grpcio's own clients, as a generic tool
(grpcurl, a load balancer's health check) would.

    grpc_probe.py ADDR CA_PEM health [SERVICE]   prints the serving status, e.g. SERVING
    grpc_probe.py ADDR CA_PEM services           prints the services reflection lists, one a line

ADDR is HOST:PORT; CA_PEM the coordinator's CA certificate ("-" for a plaintext connection).
"""
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def channel(addr, ca):
    if ca == "-":
        return grpc.insecure_channel(addr)
    with open(ca, "rb") as f:
        creds = grpc.ssl_channel_credentials(root_certificates=f.read())
    return grpc.secure_channel(addr, creds)


def main():
    addr, ca, what = sys.argv[1:4]
    with channel(addr, ca) as ch:
        if what == "health":
            service = sys.argv[4] if len(sys.argv) > 4 else ""
            stub = health_pb2_grpc.HealthStub(ch)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            print(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
        elif what == "services":
            for name in ProtoReflectionDescriptorDatabase(ch).get_services():
                print(name)
        else:
            sys.exit(f"unknown question {what!r}")


if __name__ == "__main__":
    main()
