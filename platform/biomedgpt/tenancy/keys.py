"""Serving API keys as the serving side holds them: a key store that reloads its file, and a limit on failures.

A key is `<key-id>.<secret>`; only a salted scrypt hash of the secret is stored, under the key's id and the
department it belongs to. `ApiKeyStore.authenticate(key)` looks the id up and checks the one hash stored
under it, so a request costs one scrypt at most (none for an unknown id or a malformed key, none for a key
that matched before).

The keys come from cluster/tenants.yaml (`ApiKeyStore.from_tenants`, local serving) or from a key file
(`ApiKeyStore.from_file`): on the cluster, the department's Secret `<department>-biomedgpt-api-keys`
(rendered from tenants.yaml by `biomedgpt cluster render`) mounted into its RayService. The file is checked
for changes at most every `check_s` seconds and read again when it changed, so adding, rotating and revoking
a key needs `kubectl apply` only: a revoked key fails from the next check on, even if it matched before.

    team: stanford-like-radiology          # the department whose keys these are
    apiKeys:
      - {id: radiology-viewer-2026, hash: "scrypt$n=16384,r=8,p=1$<salt>$<digest>"}

`FailureLimiter` counts failed authentications per client address in a sliding window; past the limit a
client is refused before any lookup (HTTP 429). Failures are never cached with the valid keys, so no
number of wrong keys can evict a valid one.
"""

from __future__ import annotations

import collections
import hashlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from . import _HASH, KEY_ID_PATTERN, Tenants, parse_api_key, secret_matches

KEY_FILE_NAME = "api-keys.yaml"


class KeyFileError(ValueError):
    """A key file that cannot be read or is malformed; the message names the file and the field."""


@dataclass(frozen=True)
class KeyMatch:
    """Who a valid key belongs to."""

    team: str
    key_id: str


def key_file_text(team: str, keys: Any, header: str = "") -> str:
    """The key file of one department (what its Secret holds): `keys` are ApiKey objects of tenants.yaml."""
    entries = [{"id": k.id, "hash": k.hash} for k in keys]
    return header + yaml.safe_dump({"team": team, "apiKeys": entries}, sort_keys=False, width=200)


def read_key_file(path: str | Path, team: str | None = None) -> dict[str, tuple[str, str]]:
    """{key id: (team, hash)} of a key file; KeyFileError naming the file and the field when it is malformed,
    or when `team` is given and the file is another department's."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as err:
        raise KeyFileError(f"{p}: cannot read the API key file: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise KeyFileError(f"{p}: not valid YAML: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("team"), str) or \
            not isinstance(data.get("apiKeys", []), list):
        raise KeyFileError(f"{p}: expected a mapping with `team` (a department) and `apiKeys` (a list)")
    if team is not None and data["team"] != team:
        raise KeyFileError(f"{p}: team: {data['team']!r} is not the department this app serves ({team!r})")
    out: dict[str, tuple[str, str]] = {}
    for i, entry in enumerate(data.get("apiKeys") or []):
        where = f"{p}: apiKeys[{i}]"
        if not isinstance(entry, dict):
            raise KeyFileError(f"{where}: expected a mapping with id and hash")
        key_id, stored = entry.get("id"), entry.get("hash")
        if not isinstance(key_id, str) or not KEY_ID_PATTERN.match(key_id):
            raise KeyFileError(f"{where}.id: {key_id!r} is not a key id (lower-case letters, digits, '-', '_')")
        if not isinstance(stored, str) or not _HASH.match(stored):
            raise KeyFileError(f"{where}.hash: not a scrypt hash (scrypt$n=..,r=..,p=..$<salt>$<digest>)")
        if key_id in out:
            raise KeyFileError(f"{where}.id: {key_id!r} appears twice")
        out[key_id] = (data["team"], stored)
    return out


class ApiKeyStore:
    """Key id -> (department, hash); see the module docstring."""

    def __init__(self, keys: Mapping[str, tuple[str, str]], source: str, *, path: Path | None = None,
                 team: str | None = None, check_s: float = 2.0) -> None:
        self._keys = dict(keys)
        self.source = source
        self._path, self._team, self.check_s = path, team, check_s
        self._lock = threading.Lock()
        self._signature = self._stat() if path else None
        self._next_check = time.monotonic() + check_s
        self.reloads = 0
        self.error: str | None = None

    @classmethod
    def from_tenants(cls, tenants: Tenants, team: str | None = None) -> "ApiKeyStore":
        """The keys of tenants.yaml: every department's, or `team`'s only."""
        keys = {k.id: (t.name, k.hash) for t in tenants.teams.values() for k in t.api_keys
                if team is None or t.name == team}
        return cls(keys, f"{tenants.path}" + (f" ({team})" if team else ""), team=team)

    @classmethod
    def from_file(cls, path: str | Path, team: str | None = None, check_s: float = 2.0) -> "ApiKeyStore":
        """The keys of a key file (a mounted Secret), read again whenever it changes."""
        p = Path(path)
        return cls(read_key_file(p, team), str(p), path=p, team=team, check_s=check_s)

    def _stat(self) -> tuple | None:
        try:
            st = os.stat(self._path)  # follows the Secret volume's ..data symlink: an update is a new inode
            digest = hashlib.sha256(self._path.read_bytes()).hexdigest()
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size, digest

    def refresh(self, *, force: bool = False) -> None:
        """Read the key file again if it changed (at most every check_s seconds unless forced). A file that
        disappeared or became malformed leaves no valid key (fail closed) and says why in `error`."""
        if self._path is None:
            return
        now = time.monotonic()
        if not force and now < self._next_check:
            return
        with self._lock:
            self._next_check = now + self.check_s
            signature = self._stat()
            if signature == self._signature and signature is not None and self.error is None:
                return
            self._signature = signature
            try:
                keys = read_key_file(self._path, self._team)
                self.error = None
            except KeyFileError as err:
                keys, self.error = {}, str(err)
            self._keys = keys
            self.reloads += 1

    def ids(self) -> list[str]:
        self.refresh()
        return sorted(self._keys)

    def lookup(self, key: Any) -> tuple[str, str, str] | None:
        """(key id, secret, team) when the key has the form `<key-id>.<secret>` and its id is known (no scrypt)."""
        self.refresh()
        parsed = parse_api_key(key)
        if parsed is None or parsed[0] not in self._keys:
            return None
        return parsed[0], parsed[1], self._keys[parsed[0]][0]

    def authenticate(self, key: Any) -> KeyMatch | None:
        """Who `key` belongs to, or None: at most one scrypt (the hash stored under the key's id)."""
        found = self.lookup(key)
        if found is None:
            return None
        key_id, secret, team = found
        entry = self._keys.get(key_id)
        if entry is None or not secret_matches(entry[1], secret):
            return None
        return KeyMatch(team, key_id)


class FailureLimiter:
    """At most `max_failures` failed authentications per client address in `window_s` seconds; the table of
    addresses is bounded (`max_clients`, oldest forgotten first) and separate from any valid key."""

    def __init__(self, max_failures: int = 10, window_s: float = 60.0, max_clients: int = 10000) -> None:
        self.max_failures, self.window_s, self.max_clients = max_failures, window_s, max_clients
        self._failures: "collections.OrderedDict[str, collections.deque[float]]" = collections.OrderedDict()
        self._lock = threading.Lock()

    def retry_after(self, client: str, now: float | None = None) -> float:
        """Seconds until `client` may try again (0: it may now)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            times = self._failures.get(client)
            if not times:
                return 0.0
            while times and times[0] <= now - self.window_s:
                times.popleft()
            if len(times) < self.max_failures:
                return 0.0
            return max(0.0, times[0] + self.window_s - now)

    def failed(self, client: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            times = self._failures.pop(client, None) or collections.deque(maxlen=self.max_failures)
            times.append(now)
            self._failures[client] = times
            while len(self._failures) > self.max_clients:
                self._failures.popitem(last=False)
