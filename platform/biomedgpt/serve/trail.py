"""The serving app's audit trail: one JSON line per `/v1` request (`biomedgpt.audit`).

`RequestTrail` is ASGI middleware around the FastAPI app. It hashes the request body as the app reads it
(sha256 and size; the body itself is never kept), notes the status the app answered with (500 when the app
raised) and the latency, and takes who asked and which model answered from the request's state, where the
ingress puts them (`note`): the department and key id once the API key is checked (a key that failed is
recorded by the id it claimed, when it has the `<key-id>.<secret>` form), the model id@version once it is
resolved. A body the app did not read to its end (refused before reading: 401, 429) has no sha256.

The line goes to the replica's `AuditLog` (`use`), which writes it from a thread: the request never waits
for the audit storage.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any, Optional

from ..audit import AuditLog, audit_root, now_iso
from ..spec import ServeAppSpec

_trail: Optional[AuditLog] = None


def use(trail: Optional[AuditLog]) -> None:
    """Where this process's request lines go (the ingress replica sets it; None: no trail)."""
    global _trail
    _trail = trail


def request_trail(spec: ServeAppSpec) -> Optional[AuditLog]:
    """The writer of a serving spec's request lines, or None when its audit is off."""
    if not spec.audit.enabled:
        return None
    return AuditLog(spec.audit.root or audit_root(spec.registry), "requests", flush_s=spec.audit.flush_s)


def note(request: Any, **fields: Any) -> None:
    """Record who asked / which model on the request, for its audit line."""
    for name, value in fields.items():
        setattr(request.state, f"audit_{name}", value)


def _path(scope: dict) -> str:
    path = scope.get("path") or ""
    root = scope.get("root_path") or ""
    return path[len(root):] if root and path.startswith(root) else path


class RequestTrail:
    """ASGI middleware writing the audit line of every `/v1/...` request (see the module docstring)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        trail = _trail
        path = _path(scope)
        if trail is None or scope.get("type") != "http" or not path.startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        at = now_iso()
        digest = hashlib.sha256()
        seen = {"bytes": 0, "complete": False, "status": None}
        state = scope.setdefault("state", {})

        async def hashing_receive():
            message = await receive()
            if message.get("type") == "http.request":
                body = message.get("body") or b""
                digest.update(body)
                seen["bytes"] += len(body)
                if not message.get("more_body", False):
                    seen["complete"] = True
            return message

        async def watching_send(message):
            if message.get("type") == "http.response.start" and seen["status"] is None:
                seen["status"] = int(message.get("status", 0))
            await send(message)

        try:
            await self.app(scope, hashing_receive, watching_send)
        except BaseException:
            if seen["status"] is None:
                seen["status"] = 500
            raise
        finally:
            trail.append({
                "time": at, "kind": "request", "method": scope.get("method"), "endpoint": path[:100],
                "department": state.get("audit_department"), "key_id": state.get("audit_key_id"),
                "claimed_key_id": state.get("audit_claimed_key_id"), "requested": state.get("audit_requested"),
                "model": state.get("audit_model"),
                "input_sha256": digest.hexdigest() if seen["complete"] else None, "input_bytes": seen["bytes"],
                "status": seen["status"], "latency_ms": round((time.monotonic() - started) * 1000, 2),
            })
