"""A minimal OTLP/gRPC trace receiver for tests/tests/tracing.rs.

Usage: otlp_receiver.py OUT_FILE

Listens on a port of 127.0.0.1 that the OS picks, prints `LISTENING <port>`
once it accepts exports, and appends one JSON object per received span to
OUT_FILE: trace_id, span_id, parent_span_id (hex, "" for a root), name,
service_name, service_instance_id and the span's attributes. Each export
is appended with one write, whole lines only. Exits when its standard
input closes (or when killed).
"""

import json
import sys
import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import (
    trace_service_pb2,
    trace_service_pb2_grpc,
)


def value(v):
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind in ("array_value", "kvlist_value", "bytes_value"):
        return str(getattr(v, kind))
    return getattr(v, kind)


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, out):
        self.out = out
        self.lock = threading.Lock()

    def Export(self, request, context):
        lines = []
        for rs in request.resource_spans:
            resource = {kv.key: value(kv.value) for kv in rs.resource.attributes}
            for ss in rs.scope_spans:
                for span in ss.spans:
                    lines.append(
                        json.dumps(
                            {
                                "trace_id": span.trace_id.hex(),
                                "span_id": span.span_id.hex(),
                                "parent_span_id": span.parent_span_id.hex(),
                                "name": span.name,
                                "service_name": resource.get("service.name"),
                                "service_instance_id": resource.get("service.instance.id"),
                                "attributes": {
                                    kv.key: value(kv.value) for kv in span.attributes
                                },
                            }
                        )
                        + "\n"
                    )
        with self.lock, open(self.out, "a", encoding="utf-8") as f:
            f.write("".join(lines))
        return trace_service_pb2.ExportTraceServiceResponse()


def main():
    out = sys.argv[1]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(out), server)
    port = server.add_insecure_port("127.0.0.1:0")
    if port == 0:
        print("ERROR cannot bind", flush=True)
        sys.exit(1)
    server.start()
    print(f"LISTENING {port}", flush=True)
    sys.stdin.read()
    server.stop(0)


if __name__ == "__main__":
    main()
