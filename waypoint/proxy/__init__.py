"""The waypoint proxy: HBONE in, HTTP routing and L7 authorization, HBONE out."""
