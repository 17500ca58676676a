"""Bounded regular expressions for route matches (Gateway API ``RegularExpression`` types).

Patterns come from route authors, so they are untrusted: RE2 (google-re2, the dialect Envoy and
Istio use) runs in linear time with a memory cap, and patterns over 1024 characters are refused
(Istio bulletin 2026-006). Matching is full-match, as Envoy's ``safe_regex``. If google-re2 is not
installed, Python's ``re`` is used with the same length limit (backtracking risk: install RE2).
Pure: no I/O.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from typing import Any

MAX_PATTERN_LENGTH = 1024

try:  # imported dynamically: google-re2 ships no type stubs
    _re2: Any = importlib.import_module("re2")
except ImportError:  # pragma: no cover - depends on the environment
    _re2 = None


def _re2_options() -> Any:
    options = _re2.Options()
    options.log_errors = False  # compile errors are reported through ConfigError instead
    options.max_mem = 1 << 20
    return options


@dataclass(frozen=True, slots=True)
class Regex:
    """A compiled, full-match pattern. Equality is by pattern text."""

    pattern: str
    _compiled: Any = field(compare=False, repr=False)

    def fullmatch(self, text: str) -> bool:
        return self._compiled.fullmatch(text) is not None


def compile_regex(pattern: str) -> Regex:
    """Compile `pattern`; ValueError with a readable reason when it is too long or invalid."""
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise ValueError(f"regular expression longer than {MAX_PATTERN_LENGTH} characters")
    try:
        if _re2 is not None:
            return Regex(pattern, _re2.compile(pattern, _re2_options()))
        return Regex(pattern, re.compile(pattern))  # pragma: no cover - fallback
    except Exception as exc:  # re2 raises its own error type; re raises re.error
        detail = exc.args[0] if exc.args else exc
        if isinstance(detail, bytes):
            detail = detail.decode("utf-8", "replace")
        raise ValueError(f"invalid regular expression: {detail}") from exc
