"""The audit trail: who asked what of which model, and which jobs were admitted or refused.

Two kinds of JSON lines, both under the registry's storage (`<registry>/_audit/`, or `$BIOMEDGPT_AUDIT`):

    <root>/requests/<YYYY-MM-DD>/<writer>.jsonl     one line per `/v1` request the serving app answered
    <root>/admission/<YYYY-MM-DD>/<writer>.jsonl    one line per admission decision of `run`, `submit`,
                                                    `k8s rayjob`

A request line holds the time (UTC, ISO 8601), endpoint, department, API key id, model id@version, the
sha256 and size of the request body, the status and the latency; never the image or the text. An admission
line holds the door, the spec file, team, run, kind, the decision and, when refused, the field, subject and
rule. Lines are only ever appended: locally each writer (one process) appends to its own file of the day
with O_APPEND; on object storage, which cannot append, each flush writes a new object
`<writer>-<sequence>.jsonl` and nothing is ever rewritten. The day folder is the rotation: a new folder
each UTC day, so old days can be archived or expired by the storage's lifecycle rules.

A serving replica buffers its lines and flushes them every `flush_s` seconds from a thread (and at exit):
a replica killed in between loses at most that many seconds of lines. Audit storage that fails never fails
a request or a job: the lines wait in memory (up to `MAX_PENDING`, then the oldest are dropped and counted)
and a warning is logged.

    biomedgpt audit show --department radiology --since 2h      (read_audit + format_table)
"""

from __future__ import annotations

import atexit
import datetime as dt
import json
import logging
import os
import re
import secrets
import socket
import sys
import threading
from typing import Any, Callable, Iterator

from .data import storage as st
from .tenancy import AdmissionError, Tenants, admit

log = logging.getLogger("biomedgpt.audit")

AUDIT_ENV = "BIOMEDGPT_AUDIT"
KINDS = ("requests", "admission")
#: lines a writer keeps while its storage fails, before it drops the oldest
MAX_PENDING = 100_000
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
_WRITER_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def audit_root(registry: str | None = None) -> str:
    """Where the trail lives: $BIOMEDGPT_AUDIT, else `_audit` under the registry (`registry`, else
    $BIOMEDGPT_REGISTRY, else ./registry); a local root is made absolute, so every process writes the same
    folder whatever its working directory."""
    root = os.environ.get(AUDIT_ENV) or st.join(st.registry_url(registry), "_audit")
    return str(st.local_path(root)) if st.is_local(root) and not root.startswith("file://") else root


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(text: str, *, now: dt.datetime | None = None) -> dt.datetime:
    """A point in time from `2026-12-05`, `2026-12-05T14:00`, `2026-12-05T14:00:00Z` (UTC unless an offset is
    given) or a duration before now: `90s`, `30m`, `2h`, `7d`. ValueError names what it cannot read."""
    text = text.strip()
    now = now or dt.datetime.now(dt.timezone.utc)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd])", text)
    if m:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[m.group(2)]
        return now - dt.timedelta(**{unit: float(m.group(1))})
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r}: not a time (2026-12-05, 2026-12-05T14:00Z) or a duration before now "
                         "(90s, 30m, 2h, 7d)") from None
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


class AuditLog:
    """The append-only writer of one kind of line (`requests` or `admission`) for this process.

    `append` never blocks on storage and never raises: with `flush_s` > 0 a daemon thread writes the buffered
    lines every `flush_s` seconds; with `flush_s` == 0 each append is written at once (admission decisions)."""

    def __init__(self, root: str, kind: str, *, flush_s: float = 2.0, writer: str | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"audit kind {kind!r}: one of {', '.join(KINDS)}")
        self.root, self.kind, self.flush_s = root, kind, float(flush_s)
        name = writer or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.writer = _WRITER_UNSAFE.sub("_", name)[:100]
        self.dropped = 0
        self.written = 0
        self._pending: list[tuple[str, str]] = []  # (day, line)
        self._seq = 0
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        atexit.register(self.close)

    def append(self, record: dict[str, Any]) -> None:
        record = dict(record)
        record.setdefault("time", now_iso())
        try:
            line = json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False, default=str)
        except ValueError:  # a non-finite number: the record is ours, keep it readable
            line = json.dumps({k: (v if not isinstance(v, float) or v == v and abs(v) != float("inf") else None)
                               for k, v in record.items()}, sort_keys=True, separators=(",", ":"), default=str)
        with self._lock:
            self._pending.append((record["time"][:10], line))
            if len(self._pending) > MAX_PENDING:
                cut = len(self._pending) - MAX_PENDING
                del self._pending[:cut]
                self.dropped += cut
        if self.flush_s <= 0:
            self.flush()
        elif self._thread is None and not self._closed:
            self._thread = threading.Thread(target=self._loop, name=f"biomedgpt-audit-{self.kind}", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._closed:
            self._wake.wait(self.flush_s)
            self._wake.clear()
            self.flush()

    def flush(self) -> bool:
        """Write what is pending; True when nothing is left pending (False: storage failed, lines kept)."""
        with self._write_lock:
            with self._lock:
                batch, self._pending = self._pending, []
            if not batch:
                return True
            days: dict[str, list[str]] = {}
            for day, line in batch:
                days.setdefault(day, []).append(line)
            failed: list[tuple[str, str]] = []
            for day, lines in days.items():
                try:
                    self._write(day, ("\n".join(lines) + "\n").encode())
                    self.written += len(lines)
                except Exception as err:  # storage down, permissions: keep the lines, never fail the caller
                    log.warning("audit trail %s: writing %d lines failed (%s: %s); they are kept and retried",
                                self.root, len(lines), type(err).__name__, err)
                    failed.extend((day, line) for line in lines)
            if failed:
                with self._lock:
                    self._pending[:0] = failed
            return not failed

    def _write(self, day: str, data: bytes) -> None:
        folder = st.join(self.root, self.kind, day)
        if st.is_local(self.root):
            path = st.local_path(folder)
            path.mkdir(parents=True, exist_ok=True)
            fd = os.open(path / f"{self.writer}.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                view = memoryview(data)
                while view:  # one write of whole lines; a short write continues where it stopped
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            return
        self._seq += 1
        st.write_bytes(st.join(folder, f"{self.writer}-{self._seq:06d}.jsonl"), data)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        self.flush()


# --------------------------------------------------------------------------------------------------
# Admission decisions
# --------------------------------------------------------------------------------------------------

_admission_logs: dict[str, AuditLog] = {}


def admission_log(root: str | None = None) -> AuditLog:
    root = root or audit_root()
    if root not in _admission_logs:
        _admission_logs[root] = AuditLog(root, "admission", flush_s=0)
    return _admission_logs[root]


def audited_admit(door: str, spec: Any, tenants: Tenants, *, on_cluster: bool | None = None,
                  root: str | None = None, warn: Callable[[str], None] | None = None) -> None:
    """`tenancy.admit`, with its decision appended to the audit trail (admitted, or refused with the field,
    subject and rule); AdmissionError raised as admit raises it. An audit trail that cannot be written is a
    warning (`warn`, else the log), never a refusal."""
    record: dict[str, Any] = {"door": door, "spec": str(getattr(spec, "source", "<spec>")),
                              "team": getattr(spec, "team", None), "run": getattr(spec, "name", None),
                              "kind": getattr(spec, "kind", None), "policy": str(tenants.path),
                              "user": _user(), "host": socket.gethostname()}
    kwargs = {} if on_cluster is None else {"on_cluster": on_cluster}
    try:
        admit(spec, tenants, **kwargs)
    except AdmissionError as err:
        record.update(decision="refused", field=err.field, subject=err.subject, rule=err.rule)
        _record_admission(record, root, warn)
        raise
    record["decision"] = "admitted"
    _record_admission(record, root, warn)


def _record_admission(record: dict[str, Any], root: str | None, warn: Callable[[str], None] | None) -> None:
    try:
        trail = admission_log(root)
        trail.append(record)
        ok = not trail._pending
    except Exception as err:  # a root that cannot even be named
        ok, trail = False, None
        log.warning("audit trail: %s: %s", type(err).__name__, err)
    if not ok:
        msg = (f"warning: the admission decision could not be written to the audit trail "
               f"{trail.root if trail else root or '(unset)'}; it is kept in memory and retried at exit")
        (warn or _stderr)(msg)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _user() -> str | None:
    try:
        import getpass  # stdlib; getuser reads the environment or the password database

        return getpass.getuser()
    except Exception:  # no user name in a container without a passwd entry
        return None


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


class AuditReadReport:
    """What `read_audit` skipped: lines that are not JSON objects, by file."""

    def __init__(self) -> None:
        self.bad_lines: dict[str, int] = {}
        self.files = 0


def read_audit(root: str, kind: str = "requests", *, since: dt.datetime | None = None,
               until: dt.datetime | None = None, department: str | None = None,
               report: AuditReadReport | None = None) -> Iterator[dict[str, Any]]:
    """The lines of one kind, oldest first, between `since` and `until` (UTC), of `department` (a request's
    department, an admission's team). Day folders outside the range are not read; a line that is not a JSON
    object is skipped and counted in `report`."""
    if kind not in KINDS:
        raise ValueError(f"audit kind {kind!r}: one of {', '.join(KINDS)}")
    report = report if report is not None else AuditReadReport()
    base = st.join(root, kind)
    files = st.list_files(base)
    first = since.astimezone(dt.timezone.utc).date().isoformat() if since else None
    last = until.astimezone(dt.timezone.utc).date().isoformat() if until else None
    rows: list[tuple[str, dict[str, Any]]] = []
    for rel in files:
        day, _, name = rel.partition("/")
        if not _DAY.fullmatch(day) or not name.endswith(".jsonl") or "/" in name:
            continue
        if (first and day < first) or (last and day > last):
            continue
        report.files += 1
        text = st.read_bytes(st.join(base, day, name)).decode("utf-8", errors="replace")
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                when = parse_time(str(rec["time"]))
            except (ValueError, KeyError, TypeError):
                report.bad_lines[f"{kind}/{rel}"] = report.bad_lines.get(f"{kind}/{rel}", 0) + 1
                continue
            if not isinstance(rec, dict):
                report.bad_lines[f"{kind}/{rel}"] = report.bad_lines.get(f"{kind}/{rel}", 0) + 1
                continue
            if (since and when < since) or (until and when > until):
                continue
            who = rec.get("department") if kind == "requests" else rec.get("team")
            if department is not None and who != department:
                continue
            rows.append((when.isoformat(), rec))
    rows.sort(key=lambda r: r[0])
    for _, rec in rows:
        yield rec


REQUEST_COLUMNS = ("time", "department", "key_id", "endpoint", "model", "status", "latency_ms", "input_sha256")
ADMISSION_COLUMNS = ("time", "door", "team", "run", "kind", "decision", "field", "spec")


def format_table(records: list[dict[str, Any]], kind: str) -> str:
    """Fixed-width columns of the lines (the sha256 shortened to 12 characters)."""
    cols = REQUEST_COLUMNS if kind == "requests" else ADMISSION_COLUMNS
    rows = []
    for rec in records:
        row = []
        for c in cols:
            v = rec.get(c)
            text = "-" if v is None else str(v)
            if c == "input_sha256" and v:
                text = text[:12]
            row.append(text.replace("\n", " ")[:80])
        rows.append(row)
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)
