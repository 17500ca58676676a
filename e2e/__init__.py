"""End-to-end harness: the lab (nodes and pods as network namespaces), scenarios and the demo."""
