"""The lab: a small cluster of network namespaces (fabric bridge, nodes, pods) with real rules, ztunnels
and waypoints.

`spec` (pure: spec file, address plan, ztunnel/waypoint configs), `topology` (namespaces, links, routes),
`cluster` (a running lab: CA, configs, ztunnel and waypoint processes, exec, status, teardown), `apps`
(the unmodified HTTP/echo/gRPC servers and gRPC client run in pods), `wire` (pure: what a packet
capture proves), `cli` (`ambient-lab up|down|status|exec|demo`).
"""
