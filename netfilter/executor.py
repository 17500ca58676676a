"""The seam between rule application and the system: running CLI tools (optionally inside a netns).

`SubprocessExecutor` runs real commands, entering a network namespace by path with `nsenter --net=`.
`RecordingExecutor` is the fake for unit tests (Istio's DependenciesStub analogue): it records every
call and answers from a handler, so the apply logic can be tested without root.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecResult:
    returncode: int
    stdout: str = ""
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Call:
    """One recorded command: argv, the netns path it ran in (None = current), and its stdin."""

    argv: tuple[str, ...]
    netns: str | None = None
    stdin: str | None = None


class Executor(Protocol):
    def run(
        self,
        argv: Sequence[str],
        *,
        netns: str | None = None,
        stdin: str | None = None,
        timeout: float = 30.0,
    ) -> ExecResult:
        """Run `argv` (inside the netns at path `netns` if given) and return its result."""
        ...


class SubprocessExecutor:
    """Runs commands for real; a missing binary or a timeout becomes a failed `ExecResult`."""

    def run(
        self,
        argv: Sequence[str],
        *,
        netns: str | None = None,
        stdin: str | None = None,
        timeout: float = 30.0,
    ) -> ExecResult:
        full = ["nsenter", f"--net={netns}", "--", *argv] if netns else list(argv)
        try:
            proc = subprocess.run(
                full, input=stdin, capture_output=True, text=True, timeout=timeout, check=False
            )
        except FileNotFoundError as exc:
            return ExecResult(returncode=127, stderr=f"{full[0]}: not found ({exc})")
        except subprocess.TimeoutExpired:
            return ExecResult(returncode=124, stderr=f"timed out after {timeout}s: {full}")
        return ExecResult(returncode=proc.returncode, stdout=proc.stdout, stderr=proc.stderr)


@dataclass
class RecordingExecutor:
    """Records calls; `handler` answers them (default: success with empty output)."""

    handler: Callable[[Call], ExecResult] = field(default=lambda call: ExecResult(returncode=0))
    calls: list[Call] = field(default_factory=list)

    def run(
        self,
        argv: Sequence[str],
        *,
        netns: str | None = None,
        stdin: str | None = None,
        timeout: float = 30.0,
    ) -> ExecResult:
        call = Call(argv=tuple(argv), netns=netns, stdin=stdin)
        self.calls.append(call)
        return self.handler(call)

    def commands(self) -> list[str]:
        """The recorded argv's as strings (for compact assertions)."""
        return [" ".join(c.argv) for c in self.calls]
