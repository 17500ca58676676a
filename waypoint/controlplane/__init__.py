"""Control-plane side of cluster mode: a generic delta-xDS server and Istio's certificate service.

`delta` is the sans-IO core (snapshot, per-client subscription state, deltas), `xds_server` and
`ca_server` are the grpc.aio shells.
"""
