"""The audit trail: every `/v1` request and every admission decision leaves one JSON line, append-only, under
the registry's storage (`biomedgpt.audit`, `serve/trail.py`), readable with `biomedgpt audit show`.

The writer: lines go to a folder per UTC day (the rotation); locally each process appends to its own file,
on object storage each flush is a new object and nothing is rewritten; storage that fails never fails the
caller and loses nothing while memory lasts. The middleware: the body's sha256 and size (never the body),
the status (500 when the app raises), the latency, and who asked with which key of which model. Admission:
`run`, `submit` and `k8s rayjob` record admitted and refused jobs with the field and rule. The reader:
department and time filters, day folders outside the range unread, lines that are not records skipped and
counted. The requests of a real Serve app are checked in tests/serve/test_app.py
(`test_served_requests_leave_audit_lines`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fastapi import FastAPI, Request  # module level: the endpoints' annotations are resolved from here
from fastapi.responses import JSONResponse

from tests_paths import REPO

TENANTS = REPO / "cluster" / "tenants.yaml"
CLUSTER_SPEC = REPO / "cluster" / "jobs" / "stanford-like-radiology-vqa-rad.yaml"
OTHER = "s3://biomedgpt-stanford-like/pathology"


def lines_of(folder: Path) -> list[dict]:
    out = []
    for f in sorted(folder.rglob("*.jsonl")):
        out += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return out


# ----------------------------------------------------------------------------------------------
# The writer
# ----------------------------------------------------------------------------------------------


def test_lines_are_appended_to_one_file_per_writer_and_day(tmp_path):
    from biomedgpt.audit import AuditLog

    a = AuditLog(str(tmp_path), "requests", flush_s=0, writer="replica-a")
    b = AuditLog(str(tmp_path), "requests", flush_s=0, writer="replica-b")
    a.append({"time": "2026-12-04T23:59:59.900Z", "department": "radiology", "status": 200})
    a.append({"time": "2026-12-05T00:00:00.100Z", "department": "radiology", "status": 401})
    b.append({"time": "2026-12-05T00:00:01.000Z", "department": "pathology", "status": 200})
    a.append({"time": "2026-12-05T00:00:02.000Z", "department": "radiology", "status": 403})
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.jsonl"))
    assert files == ["requests/2026-12-04/replica-a.jsonl", "requests/2026-12-05/replica-a.jsonl",
                     "requests/2026-12-05/replica-b.jsonl"]
    day = tmp_path / "requests" / "2026-12-05"
    assert [json.loads(x)["status"] for x in (day / "replica-a.jsonl").read_text().splitlines()] == [401, 403]
    # appending never rewrote the earlier line: the file grew by whole lines
    assert (day / "replica-a.jsonl").read_text().count("\n") == 2


def test_a_flushing_writer_writes_from_its_thread_and_at_close(tmp_path):
    from biomedgpt.audit import AuditLog

    trail = AuditLog(str(tmp_path), "requests", flush_s=0.05, writer="w")
    for i in range(50):
        trail.append({"department": "radiology", "status": 200, "n": i})
    deadline = dt.datetime.now() + dt.timedelta(seconds=10)
    while len(lines_of(tmp_path)) < 50 and dt.datetime.now() < deadline:
        pass
    trail.append({"department": "radiology", "status": 200, "n": 50})
    trail.close()
    assert [r["n"] for r in lines_of(tmp_path)] == list(range(51))


def test_storage_that_fails_keeps_the_lines_and_never_raises(tmp_path):
    from biomedgpt.audit import AuditLog

    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the trail's folder should be")
    trail = AuditLog(str(blocked), "requests", flush_s=0, writer="w")
    trail.append({"department": "radiology", "status": 200})  # no exception
    assert not trail.flush() and len(trail._pending) == 1 and trail.written == 0
    blocked.unlink()
    assert trail.flush() and trail.written == 1
    assert lines_of(blocked)[0]["department"] == "radiology"


def test_on_object_storage_each_flush_is_a_new_object(s3_bucket):
    from biomedgpt.audit import AuditLog, read_audit
    from biomedgpt.data import storage as st

    root = f"{s3_bucket}/registry/_audit"
    trail = AuditLog(root, "requests", flush_s=0, writer="replica")
    trail.append({"time": "2026-12-05T10:00:00Z", "department": "radiology", "status": 200})
    trail.append({"time": "2026-12-05T10:00:01Z", "department": "pathology", "status": 200})
    objects = st.list_files(root)
    assert list(objects) == ["requests/2026-12-05/replica-000001.jsonl", "requests/2026-12-05/replica-000002.jsonl"]
    assert [r["department"] for r in read_audit(root, "requests")] == ["radiology", "pathology"]
    assert [r["department"] for r in read_audit(root, "requests", department="pathology")] == ["pathology"]


def test_the_trail_lies_under_the_registry_and_the_registry_does_not_list_it(tmp_path, monkeypatch):
    from biomedgpt.audit import AuditLog, audit_root
    from biomedgpt.serve.registry import Registry

    monkeypatch.delenv("BIOMEDGPT_AUDIT", raising=False)
    registry = tmp_path / "registry"
    assert audit_root(str(registry)) == str(registry / "_audit")
    monkeypatch.setenv("BIOMEDGPT_REGISTRY", str(registry))
    assert audit_root() == str(registry / "_audit")
    AuditLog(audit_root(), "requests", flush_s=0, writer="w").append({"department": "radiology"})
    assert Registry(str(registry)).list() == []
    monkeypatch.setenv("BIOMEDGPT_AUDIT", str(tmp_path / "elsewhere"))
    assert audit_root(str(registry)) == str(tmp_path / "elsewhere")


# ----------------------------------------------------------------------------------------------
# The reader
# ----------------------------------------------------------------------------------------------


def test_reading_filters_by_department_and_time_and_skips_what_is_not_a_record(tmp_path):
    from biomedgpt.audit import AuditLog, AuditReadReport, parse_time, read_audit

    trail = AuditLog(str(tmp_path), "requests", flush_s=0, writer="w")
    for day, hour, dept in [("01", 9, "radiology"), ("03", 9, "radiology"), ("03", 12, "pathology"),
                            ("04", 8, "radiology")]:
        trail.append({"time": f"2026-12-{day}T{hour:02d}:00:00Z", "department": dept, "status": 200})
    bad = tmp_path / "requests" / "2026-12-03" / "w.jsonl"
    with open(bad, "a") as f:
        f.write("not json\n[1, 2]\n{\"no\": \"time\"}\n")
    (tmp_path / "requests" / "2026-12-03" / "notes.txt").write_text("ignored: not a .jsonl")
    report = AuditReadReport()
    got = list(read_audit(str(tmp_path), "requests", since=parse_time("2026-12-03"), department="radiology",
                          report=report))
    assert [r["time"] for r in got] == ["2026-12-03T09:00:00Z", "2026-12-04T08:00:00Z"]
    assert report.bad_lines == {"requests/2026-12-03/w.jsonl": 3}
    assert report.files == 2  # the day folder before --since was not read
    until = list(read_audit(str(tmp_path), "requests", until=parse_time("2026-12-03T10:00Z")))
    assert [r["time"][:10] for r in until] == ["2026-12-01", "2026-12-03"]


def test_times_and_durations():
    from biomedgpt.audit import parse_time

    now = dt.datetime(2026, 12, 5, 12, 0, tzinfo=dt.timezone.utc)
    assert parse_time("2h", now=now) == dt.datetime(2026, 12, 5, 10, 0, tzinfo=dt.timezone.utc)
    assert parse_time("7d", now=now) == dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.timezone.utc)
    assert parse_time("2026-12-05T14:00+01:00").hour == 14 and parse_time("2026-12-05").tzinfo is not None
    with pytest.raises(ValueError, match="'yesterday': not a time"):
        parse_time("yesterday")


def test_audit_show_prints_a_department_since_a_time(tmp_path):
    from biomedgpt.audit import AuditLog

    trail = AuditLog(str(tmp_path), "requests", flush_s=0, writer="w")
    recent = dt.datetime.now(dt.timezone.utc).isoformat().replace("+00:00", "Z")
    trail.append({"time": "2026-01-01T00:00:00Z", "department": "radiology", "status": 200, "key_id": "old"})
    trail.append({"time": recent, "department": "radiology", "status": 200, "key_id": "k1",
                  "endpoint": "/v1/vqa", "model": "radiology/vqa@3", "input_sha256": "ab" * 32, "latency_ms": 12.5})
    trail.append({"time": recent, "department": "pathology", "status": 200, "key_id": "k2"})
    cmd = [sys.executable, "-m", "biomedgpt.cli", "audit", "show", "--root", str(tmp_path),
           "--department", "radiology", "--since", "1h"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "requests of radiology: 1 line(s)" in out.stdout
    assert "k1" in out.stdout and "radiology/vqa@3" in out.stdout and "abababababab" in out.stdout
    assert "k2" not in out.stdout and "old" not in out.stdout
    as_json = subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=120)
    assert [json.loads(x)["key_id"] for x in as_json.stdout.splitlines()] == ["k1"]
    wrong = subprocess.run(cmd[:-1] + ["last tuesday"], capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 2 and "not a time" in wrong.stderr


# ----------------------------------------------------------------------------------------------
# The middleware
# ----------------------------------------------------------------------------------------------


def _app(trail_log):
    from biomedgpt.serve import trail

    app = FastAPI()
    app.add_middleware(trail.RequestTrail)

    @app.post("/v1/vqa")
    async def vqa(request: Request):
        body = await request.json()
        trail.note(request, department="radiology", key_id="k1")
        if body.get("boom"):
            raise RuntimeError("a defect")
        trail.note(request, model="radiology/vqa@2")
        return JSONResponse({"answer": "yes"})

    @app.post("/v1/refused")
    async def refused(request: Request):
        trail.note(request, claimed_key_id="intruder")
        return JSONResponse({"detail": "Authorization: ..."}, status_code=401)

    @app.get("/healthz")
    async def health():
        return {"status": "ok"}

    trail.use(trail_log)
    return app


def test_every_v1_request_leaves_a_line_with_the_body_hash_never_the_body(tmp_path):
    from fastapi.testclient import TestClient

    from biomedgpt.audit import AuditLog

    client = TestClient(_app(AuditLog(str(tmp_path), "requests", flush_s=0, writer="w")),
                        raise_server_exceptions=False)
    body = json.dumps({"question": "is there a fracture?", "image": "aGVsbG8="}).encode()
    assert client.post("/v1/vqa", content=body, headers={"Content-Type": "application/json"}).status_code == 200
    assert client.post("/v1/vqa", json={"boom": True}).status_code == 500
    assert client.post("/v1/refused", content=b"").status_code == 401
    assert client.get("/healthz").status_code == 200  # not a /v1 request: no line
    ok, boom, refused = lines_of(tmp_path)
    assert ok["input_sha256"] == hashlib.sha256(body).hexdigest() and ok["input_bytes"] == len(body)
    assert (ok["status"], ok["department"], ok["key_id"], ok["model"], ok["endpoint"]) == \
        (200, "radiology", "k1", "radiology/vqa@2", "/v1/vqa")
    assert ok["latency_ms"] >= 0 and ok["time"].endswith("Z")
    assert "fracture" not in json.dumps([ok, boom, refused]) and "aGVsbG8" not in json.dumps([ok, boom, refused])
    assert boom["status"] == 500 and boom["model"] is None and boom["key_id"] == "k1"
    assert refused["status"] == 401 and refused["department"] is None and refused["claimed_key_id"] == "intruder"


def test_the_serving_app_has_the_trail_and_its_spec_section():
    from biomedgpt.serve.app import api
    from biomedgpt.serve.trail import RequestTrail
    from biomedgpt.spec import SpecError, serve_spec_from_dict

    assert any(m.cls is RequestTrail for m in api.user_middleware)
    spec = serve_spec_from_dict({"kind": "serve", "name": "x", "registry": "/tmp/r"})
    assert spec.audit.enabled and spec.audit.root is None and spec.audit.flush_s == 2.0
    with pytest.raises(SpecError, match="audit.flush_s"):
        serve_spec_from_dict({"kind": "serve", "name": "x", "registry": "/tmp/r", "audit": {"flush_s": 0}})
    with pytest.raises(SpecError, match="audit"):
        serve_spec_from_dict({"kind": "serve", "name": "x", "registry": "/tmp/r", "audit": {"path": "/x"}})


# ----------------------------------------------------------------------------------------------
# Admission decisions
# ----------------------------------------------------------------------------------------------


def _spec_file(tmp_path: Path, **changes) -> Path:
    data = yaml.safe_load(CLUSTER_SPEC.read_text())
    data["data"]["eval"] = []
    for key, value in changes.items():
        section, name = key.split("__")
        data[section][name] = value
    out = tmp_path / "jobs" / "radiology.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def test_every_door_records_its_admission_decision(tmp_path, monkeypatch):
    from biomedgpt.audit import read_audit
    from biomedgpt.cluster.rayjob import rayjob_manifests
    from biomedgpt.spec import load_spec
    from biomedgpt.tenancy import AdmissionError, load_tenants

    root = tmp_path / "audit"
    monkeypatch.setenv("BIOMEDGPT_AUDIT", str(root))
    tenants = load_tenants(TENANTS)
    good = _spec_file(tmp_path / "good")
    rayjob_manifests(load_spec(good), good, tenants)
    bad = _spec_file(tmp_path / "bad", output__storage=f"{OTHER}/runs")
    with pytest.raises(AdmissionError):
        rayjob_manifests(load_spec(bad), bad, tenants)
    # the real command line: `biomedgpt run` and `biomedgpt submit` refuse before anything starts
    env = {**os.environ, "BIOMEDGPT_AUDIT": str(root)}
    env.pop("BIOMEDGPT_TENANTS", None)
    for cmd in (["run", str(bad)], ["submit", str(bad), "--address", "http://127.0.0.1:9"]):
        out = subprocess.run([sys.executable, "-m", "biomedgpt.cli", *cmd], capture_output=True, text=True,
                             timeout=300, env=env, cwd=tmp_path)
        assert out.returncode == 2 and "may not" in out.stderr, out.stderr
    got = list(read_audit(str(root), "admission"))
    assert [(r["door"], r["decision"]) for r in got] == [("k8s rayjob", "admitted"), ("k8s rayjob", "refused"),
                                                         ("run", "refused"), ("submit", "refused")]
    refused = got[1]
    assert refused["field"] == "output.storage" and refused["team"] == "stanford-like-radiology"
    assert refused["spec"] == str(bad) and refused["rule"] and refused["policy"].endswith("tenants.yaml")
    assert got[2]["spec"].endswith("radiology.yaml") and got[2]["field"] == "output.storage"
    assert [r["door"] for r in read_audit(str(root), "admission", department="nobody")] == []
