"""Waypoints: the manager that turns Gateway objects into waypoint deployments, and the L7 proxy."""
