"""Who may ask the serving app, and which models they may be answered by.

`Gate` is the ingress's door: the API key of a request (`Authorization: Bearer <key-id>.<secret>` or
`X-API-Key`) -> the caller's department, through `biomedgpt.tenancy.keys.ApiKeyStore` (one scrypt at most per
request; the key file `api_keys` reloaded when it changes; with the spec's `team`, that department's keys
only). A client address that failed `limits.auth_failures_per_minute` times in the last minute gets 429
before its key is even looked up. `check_model` refuses (403) a model trained on credentialed data to a
caller whose department is not granted that data (`tenancy.model_data_refusal`).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from ..spec import ServeAppSpec
from ..tenancy import Tenants, model_data_refusal, parse_api_key
from ..tenancy.keys import ApiKeyStore, FailureLimiter, KeyMatch
from .registry import ModelEntry
from .requests import ApiError, bad


class Gate:
    """The API-key check of one ingress replica (see the module docstring); `keys` is None when the app serves
    without keys (a model directory without `team`, what the demo runs)."""

    def __init__(self, spec: ServeAppSpec, tenants: Tenants, *, needs_keys: bool) -> None:
        self.team = spec.team
        self.keys: Optional[ApiKeyStore] = None
        if needs_keys:
            self.keys = (ApiKeyStore.from_file(spec.api_keys, self.team) if spec.api_keys
                         else ApiKeyStore.from_tenants(tenants, self.team))
        self.failures = FailureLimiter(spec.limits.auth_failures_per_minute, 60.0)

    @staticmethod
    def presented_key(headers: Mapping[str, str]) -> Optional[str]:
        """The API key a request presents (`X-API-Key`, else `Authorization: Bearer ...`), or None."""
        key = headers.get("x-api-key")
        auth = headers.get("authorization")
        if not key and auth and auth.lower().startswith("bearer "):
            key = auth[7:].strip()
        return key or None

    def caller(self, headers: Mapping[str, str], client: str) -> Optional[KeyMatch]:
        """The caller's department and key id (None without keys); ApiError 429, or 401 naming what is wrong."""
        if self.keys is None:
            return None
        wait = self.failures.retry_after(client)
        if wait > 0:
            raise ApiError(429, f"Authorization: too many failed API keys from {client}; retry in {wait:.0f} s",
                           "Authorization", headers={"Retry-After": str(max(1, round(wait)))})
        key = self.presented_key(headers)
        if not key:
            raise ApiError(401, "Authorization: an API key is required (Authorization: Bearer <key-id>.<secret> "
                                "or X-API-Key)", "Authorization")
        match = self.keys.authenticate(key)
        if match is None:
            self.failures.failed(client)
            what = f"one of team {self.team!r}'s keys" if self.team else "a valid API key of any department"
            form = "" if parse_api_key(key) else " (keys are <key-id>.<secret>)"
            raise ApiError(401, f"Authorization: the API key is not {what}{form}", "Authorization")
        return match

    def department(self, headers: Mapping[str, str], client: str) -> Optional[str]:
        """The caller's department (None without keys); ApiError 429, or 401 naming what is wrong."""
        match = self.caller(headers, client)
        return match.team if match else None


def check_model(entry: ModelEntry, caller: Optional[str], tenants: Tenants) -> None:
    """403 when the model's training data may not be served to the caller's department (None: no department)."""
    refusal = model_data_refusal(caller, entry.meta.train_data, tenants)
    if refusal:
        who = f"department {caller!r}" if caller else "a caller without an API key"
        raise bad("model", f"{entry.id} may not be served to {who}: {refusal}", 403)


def client_address(request: Any) -> str:
    """The address a request came from, as the proxy saw it (forwarding headers are the client's to forge)."""
    return request.client.host if getattr(request, "client", None) else "unknown"
