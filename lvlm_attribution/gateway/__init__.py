"""The typed gRPC gateway: `lvlm.v1.Explainer` (Explain, ExplainStream, Describe), grpc.health.v1
and server reflection in front of TorchServe, which keeps its raw gRPC on the pod's loopback.

    python -m lvlm_attribution.gateway --torchserve-grpc 127.0.0.1:7070 \\
        --torchserve-rest http://127.0.0.1:8080 --management http://127.0.0.1:8081 \\
        --port 50051 --metrics-port 9095

No model and no attribution logic here: `upstream` is the only code that knows TorchServe's
wrapper (input["request"], `prediction`) and which TorchServe API each RPC takes, `errors` turns
TorchServe's failures into google.rpc.Status, `service` handles deadlines and busy retries,
`server` health, reflection, metrics and shutdown. docs/api.md ("Typed gRPC service") is the
caller's guide.
"""
