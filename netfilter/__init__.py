"""Capture rules for pod network namespaces: a rule model, pure renderers (iptables-restore, nft), atomic apply.

A leaf library: imports neither ztunnel nor waypoint.
"""
