"""Run a function inside a network namespace, in a short-lived thread that setns(2)'s into it.

setns moves only the calling thread, so the caller's own thread never changes namespace, and nothing
forks: a forked child of a process that runs gRPC threads can crash, which is why this replaces
pyroute2's ``NetNS`` (it forks a helper process). Sockets keep the namespace they were created in, so a
socket (or netlink socket) made by ``fn`` can be used from any thread afterwards.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
CLONE_NEWNET = 0x40000000


class NetnsEnterError(OSError):
    """The namespace could not be entered (missing path, no permission)."""


def in_netns_thread(path: str, fn: Callable[[], T], *, timeout: float = 30.0) -> T:
    """Run ``fn`` in a new thread that has entered the netns at ``path``; return its result.

    Exceptions from ``fn`` are re-raised in the caller; a namespace that cannot be entered raises
    NetnsEnterError; ``fn`` running longer than ``timeout`` raises TimeoutError (the thread is a
    daemon and is left to finish on its own).
    """
    result: list[T] = []
    error: list[BaseException] = []

    def runner() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            error.append(NetnsEnterError(exc.errno, f"cannot open netns {path}: {exc.strerror}"))
            return
        try:
            if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                error.append(NetnsEnterError(err, f"setns({path}): {os.strerror(err)}"))
                return
        finally:
            os.close(fd)
        try:
            result.append(fn())
        except BaseException as exc:  # handed to the caller
            error.append(exc)

    thread = threading.Thread(target=runner, name=f"netns:{path}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"netns {path}: operation took longer than {timeout:.0f} s")
    if error:
        raise error[0]
    return result[0]
