"""Shared fixtures for unit tests: no root, no sockets outside loopback, no cluster."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# "fast" for everyday runs and CI; "deep" (HYPOTHESIS_PROFILE=deep) for long local fuzzing sessions.
settings.register_profile(
    "fast", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "deep", max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))
