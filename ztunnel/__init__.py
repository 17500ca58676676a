"""ztunnel: the per-node L4 proxy of the ambient data plane (HBONE, identity, L4 policy, capture)."""
