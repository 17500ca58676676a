"""The lab: a small cluster of network namespaces (fabric bridge, nodes, pods) with real rules and ztunnels.

`spec` (pure: spec file, address plan, ztunnel configs), `topology` (namespaces, links, routes),
`cluster` (a running lab: CA, configs, ztunnel processes, exec, status, teardown), `wire` (pure:
what a packet capture proves), `cli` (`ambient-lab up|down|status|exec|demo`).
"""
