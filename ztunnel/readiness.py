"""Readiness (15021 ``/healthz/ready``): ready only once configuration and certificates are loaded.

Owns the set of pending start-up tasks (``"config"``, ``"certificate <identity>"``, ...). The app
registers each before starting it and marks it done when it completes; the endpoint answers
``200 ready`` when nothing is pending, else ``500 not ready, pending: <tasks>`` (ztunnel's wording).
Once ready, later problems (a control plane outage) do not revoke readiness, as in Istio.
"""

from __future__ import annotations

from aiohttp import web


class Readiness:
    """Pending start-up tasks; ready when there are none."""

    def __init__(self) -> None:
        self._pending: dict[str, str] = {}
        self._ever_ready = False

    def register(self, task: str, detail: str = "") -> None:
        if not self._ever_ready:
            self._pending[task] = detail

    def done(self, task: str) -> None:
        self._pending.pop(task, None)
        if not self._pending:
            self._ever_ready = True

    @property
    def ready(self) -> bool:
        return not self._pending

    def pending(self) -> dict[str, str]:
        return dict(self._pending)

    def status(self) -> tuple[int, str]:
        if not self._pending:
            return 200, "ready\n"
        items = ", ".join(
            f"{task} ({detail})" if detail else task
            for task, detail in sorted(self._pending.items())
        )
        return 500, f"not ready, pending: {items}\n"

    def routes(self) -> list[web.RouteDef]:
        async def handle(_request: web.Request) -> web.Response:
            status, text = self.status()
            return web.Response(status=status, text=text)

        return [web.get("/healthz/ready", handle)]
