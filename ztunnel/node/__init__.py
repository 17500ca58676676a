"""The node agent: pods on this node -> network namespaces -> capture rules -> in-pod listeners."""
