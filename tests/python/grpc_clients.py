"""MIP Cluster as a Python team's service sees it: Google's grpcio with grpcio-reflection (a v1alpha-only
reflection client), no generated stubs.

Usage: grpc_clients.py WORKER_ADDR COORDINATOR_ADDR IMAGE_PATH

Lists the services of both addresses through reflection, describes mip.v1.Coordinator, builds SubmitJob requests
from JSON with the reflected descriptors and sends two: a malformed one (width 65, which must be refused with
INVALID_ARGUMENT naming the field) and a valid one (one 64x64 image of a subject). Prints one JSON object.
"""

import base64
import json
import sys

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase


def services(addr):
    with grpc.insecure_channel(addr) as channel:
        return sorted(ProtoReflectionDescriptorDatabase(channel).get_services())


def request(image, width):
    return {
        "requests": [
            {
                "prompt": "a cat wearing a jacket",
                "width": width,
                "height": 64,
                "steps": 2,
                "seed": "7",
                "subjects": [{"name": "cat", "images": [base64.b64encode(image).decode()]}],
            }
        ],
        "idempotency_key": f"python-grpcio-{width}",
    }


def main():
    worker, coordinator, image_path = sys.argv[1:4]
    with open(image_path, "rb") as f:
        image = f.read()
    out = {"worker_services": services(worker), "coordinator_services": services(coordinator)}
    with grpc.insecure_channel(coordinator) as channel:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        service = pool.FindServiceByName("mip.v1.Coordinator")
        out["coordinator_methods"] = sorted(m.name for m in service.methods)
        method = service.FindMethodByName("SubmitJob")
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        submit = channel.unary_unary(
            "/mip.v1.Coordinator/SubmitJob",
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )
        try:
            submit(json_format.ParseDict(request(image, 65), request_class()), timeout=60)
            out["malformed"] = {"code": "OK"}
        except grpc.RpcError as e:
            out["malformed"] = {"code": e.code().name, "details": e.details()}
        job = submit(json_format.ParseDict(request(image, 64), request_class()), timeout=60)
        out["submitted"] = json_format.MessageToDict(job, preserving_proto_field_name=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
