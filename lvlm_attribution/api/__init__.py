"""Generated protobuf code for the service contract (sources in proto/; regenerate with
`make proto`, never edit by hand).

- `lvlm_attribution.api.v1.explain_pb2`: the payload (ExplainRequest, ExplainResponse, ...).
- `lvlm_attribution.api.torchserve.inference_pb2[_grpc]`: TorchServe's gRPC transport.
"""
