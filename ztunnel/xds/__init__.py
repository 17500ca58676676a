"""Cluster-mode configuration protocols: delta xDS (Istio's workload API) over gRPC.

`convert` maps workload-API protobufs to the state model and back. `protos` is the typed entry point to the generated protobuf code (built by `scripts/gen-protos` into
`gen/`, never edited by hand), `session` the sans-IO delta-xDS client state machine, `client` its
grpc.aio shell.
"""
