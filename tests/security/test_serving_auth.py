"""The serving boundary: a department's RayService answers its own department only, a request costs one scrypt
at most, failures are limited per client and never evict valid keys, keys rotate and are revoked through the
mounted Secret without a rebuild, a model of credentialed data reaches only departments granted that data,
and a team exports only into its own department."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import yaml
from security_helpers import overlay_serve_spec, run_cli

from biomedgpt.serve.auth import Gate, check_model
from biomedgpt.serve.registry import ModelEntry, Registry, RegistryError
from biomedgpt.serve.requests import ApiError
from biomedgpt.spec import serve_spec_from_dict
from biomedgpt.tenancy import ApiKey, hash_api_key, load_tenants, new_api_key, tenants_from_dict, verify_api_key
from biomedgpt.tenancy.keys import KEY_FILE_NAME, ApiKeyStore, FailureLimiter, key_file_text
import biomedgpt.tenancy as tenancy

REPO = Path(__file__).resolve().parents[2]
STANFORD, MAYO = "stanford-like-radiology", "mayo-like-radiology"
FAST = {"n": 2**4}  # cheap scrypt for tests that hash many keys (the stored parameters travel with each hash)


@pytest.fixture
def scrypts(monkeypatch) -> list[int]:
    """Counts the scrypt computations of key checks."""
    calls: list[int] = []
    real = hashlib.scrypt

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(tenancy.hashlib, "scrypt", counting)
    return calls


def with_keys(tenants_file, keys: dict[str, list[tuple[str, str]]]):
    """The tenants file with these (id, hash) keys per team (replacing the shipped ones)."""
    def mutate(d):
        for inst in d["institutions"].values():
            for dept in inst["departments"].values():
                dept.pop("apiKeys", None)
        for team, entries in keys.items():
            inst, _, dept = team.partition("-like-")
            d["institutions"][f"{inst}-like"]["departments"][dept]["apiKeys"] = [
                {"id": i, "hash": h} for i, h in entries]
    return load_tenants(tenants_file(mutate))


# ----------------------------------------------------------------------------------------------
# One scrypt at most; failures never evict valid keys; failures limited per client
# ----------------------------------------------------------------------------------------------


def test_a_key_names_its_id_so_a_check_costs_one_scrypt_at_most(tenants_file, scrypts):
    keys = {team: [] for team in (STANFORD, MAYO, "charite-like-dermatology")}
    plain = {}
    for team in keys:
        for i in range(3):
            key = new_api_key(f"{team.split('-')[0]}-{i}")
            keys[team].append((key.partition(".")[0], hash_api_key(key, **FAST)))
            plain[key] = team
    tenants = with_keys(tenants_file, keys)
    store = ApiKeyStore.from_tenants(tenants)
    key = next(k for k, t in plain.items() if t == MAYO)
    assert key.count(".") == 1 and len(key.partition(".")[2]) == 43
    scrypts.clear()
    assert store.authenticate(key).team == MAYO and len(scrypts) == 1   # nine stored keys, one scrypt
    assert store.authenticate(key).team == MAYO and len(scrypts) == 1   # matched before: none
    kid = key.partition(".")[0]
    assert store.authenticate(f"{kid}.{'w' * 43}") is None and len(scrypts) == 2  # wrong secret: one
    for junk in (f"nobody.{'w' * 43}", "w" * 43, "", None, f"{kid}.", f"{kid}.short", "UPPER.x" + "w" * 43):
        assert store.authenticate(junk) is None
    assert len(scrypts) == 2, "an unknown id or a malformed key costs no scrypt"
    assert verify_api_key(MAYO, key, tenants) and not verify_api_key(STANFORD, key, tenants)
    assert len(scrypts) == 2


def test_failed_authentications_never_evict_valid_keys(tenants_file, scrypts):
    key = new_api_key("viewer")
    tenants = with_keys(tenants_file, {STANFORD: [("viewer", hash_api_key(key, **FAST))]})
    store = ApiKeyStore.from_tenants(tenants, STANFORD)
    assert store.authenticate(key) is not None
    scrypts.clear()
    for i in range(6000):  # more wrong secrets for the known id than any cache would hold
        assert store.authenticate(f"viewer.{i:043d}") is None
    assert len(scrypts) == 6000
    scrypts.clear()
    assert store.authenticate(key) is not None and scrypts == [], "the valid key was evicted by failures"


def test_failures_are_rate_limited_per_client_address(tenants_file, scrypts):
    key = new_api_key("viewer")
    tenants = with_keys(tenants_file, {STANFORD: [("viewer", hash_api_key(key, **FAST))]})
    spec = serve_spec_from_dict({"kind": "serve", "name": "t", "registry": "/tmp/none", "team": STANFORD,
                                 "limits": {"auth_failures_per_minute": 3}}, "<test spec>")
    gate = Gate(spec, tenants, needs_keys=True)
    bearer = lambda k: {"authorization": f"Bearer {k}"}  # noqa: E731
    for _ in range(3):
        with pytest.raises(ApiError) as err:
            gate.department(bearer(f"viewer.{'w' * 43}"), "198.51.100.7")
        assert err.value.status == 401
    scrypts.clear()
    with pytest.raises(ApiError) as err:  # the fourth try within the minute: refused before any check
        gate.department(bearer(key), "198.51.100.7")
    assert err.value.status == 429 and int(err.value.headers["Retry-After"]) >= 1 and scrypts == []
    assert "too many failed API keys from 198.51.100.7" in err.value.detail
    # another client is not held back, and its valid key works
    assert gate.department({"x-api-key": key}, "198.51.100.8") == STANFORD
    limiter = FailureLimiter(max_failures=2, window_s=60.0)
    limiter.failed("a", now=0.0)
    limiter.failed("a", now=1.0)
    assert limiter.retry_after("a", now=2.0) == pytest.approx(58.0)
    assert limiter.retry_after("a", now=60.5) == 0.0  # the first failure left the window


# ----------------------------------------------------------------------------------------------
# A department's RayService answers its own department only, with keys from its mounted Secret
# ----------------------------------------------------------------------------------------------


def test_every_rayservice_accepts_its_departments_keys_only(tmp_path, tenants, tenants_file):
    served = [t for t in tenants.teams.values() if t.serving]
    assert len(served) >= 2
    keys = {t.name: new_api_key(f"k-{t.department}-{t.institution}") for t in served}
    stored = {name: ApiKey(k.partition(".")[0], hash_api_key(k, **FAST)) for name, k in keys.items()}
    # every department's key valid in the tenants file the image carries
    with_all = with_keys(tenants_file, {name: [(k.id, k.hash)] for name, k in stored.items()})
    for team in served:
        spec = overlay_serve_spec(team.name)
        assert spec.team == team.name, "team set in the overlay"
        assert spec.api_keys == f"/etc/biomedgpt/api-keys/{KEY_FILE_NAME}" and spec.auth
        # the department's Secret as the pod sees it
        path = tmp_path / team.name / KEY_FILE_NAME
        path.parent.mkdir()
        path.write_text(key_file_text(team.name, [stored[team.name]]))
        other = next(t for t in served if t is not team)
        with pytest.raises(ValueError, match=rf"team: '{team.name}' is not the department this app serves"):
            Gate(serve_spec_from_dict(dict(spec.to_dict(), api_keys=str(path), team=other.name)), with_all,
                 needs_keys=True)
        from_file = Gate(serve_spec_from_dict(dict(spec.to_dict(), api_keys=str(path)), spec.source), with_all,
                         needs_keys=True)
        from_tenants = Gate(serve_spec_from_dict(dict(spec.to_dict(), api_keys=None), spec.source), with_all,
                            needs_keys=True)
        for gate in (from_file, from_tenants):
            for owner, key in keys.items():
                headers = {"authorization": f"Bearer {key}"}
                if owner == team.name:
                    assert gate.department(headers, "10.1.2.3") == team.name
                else:  # valid for its own department, refused here
                    with pytest.raises(ApiError, match=f"not one of team '{team.name}''s keys") as err:
                        gate.department(headers, "10.1.2.4")
                    assert err.value.status == 401


def _secret_volume(root: Path, text: str, version: int) -> None:
    """A Secret volume as the kubelet writes it: files in a timestamped folder behind the `..data` symlink,
    swapped atomically when the Secret changes."""
    folder = root / f"..2026_12_05_{version:02d}"
    folder.mkdir()
    (folder / KEY_FILE_NAME).write_text(text)
    tmp = root / "..data_tmp"
    tmp.symlink_to(folder.name)
    os.replace(tmp, root / "..data")
    if not (root / KEY_FILE_NAME).is_symlink():
        (root / KEY_FILE_NAME).symlink_to(f"..data/{KEY_FILE_NAME}")


def test_keys_rotate_and_are_revoked_through_the_mounted_secret_without_a_restart(tmp_path):
    def entry(key):
        return ApiKey(key.partition(".")[0], hash_api_key(key, **FAST))

    old, new = new_api_key("viewer-2026"), new_api_key("viewer-2027")
    root = tmp_path / "api-keys"
    root.mkdir()
    _secret_volume(root, key_file_text(STANFORD, [entry(old)]), 1)
    store = ApiKeyStore.from_file(root / KEY_FILE_NAME, STANFORD, check_s=0.0)
    assert store.authenticate(old).team == STANFORD and store.authenticate(new) is None
    _secret_volume(root, key_file_text(STANFORD, [entry(old), entry(new)]), 2)  # rotation: both for a while
    assert store.authenticate(new).team == STANFORD and store.authenticate(old).team == STANFORD
    _secret_volume(root, key_file_text(STANFORD, [entry(new)]), 3)  # revocation of the old key
    assert store.authenticate(old) is None, "a revoked key still opens the door (it matched before)"
    assert store.authenticate(new).team == STANFORD
    _secret_volume(root, "team: [not, a, department]\n", 4)  # a broken file: closed, saying why
    assert store.authenticate(new) is None and "expected a mapping" in store.error
    assert store.reloads == 3
    (tmp_path / "bad.yaml").write_text("team: x\napiKeys: [{id: a, hash: plain}]\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: apiKeys\[0\]\.hash: not a scrypt hash"):
        ApiKeyStore.from_file(tmp_path / "bad.yaml")


def test_tenants_add_key_and_revoke_key_print_the_hash_and_the_manifest_change(tmp_path, capsys, tenants_file):
    from biomedgpt.cluster.render import api_keys_secret

    path = tenants_file()
    assert run_cli(["tenants", "add-key", STANFORD, "--id", "pacs-2027", "--tenants", str(path)]) == 0
    out = capsys.readouterr().out
    key = out.splitlines()[1].strip()
    assert key.startswith("pacs-2027.")
    digest = next(line for line in out.splitlines() if line.startswith("hash: ")).split()[1]
    assert f"+    - id: pacs-2027\n+      hash: {digest}\n" in out  # the line the Secret gains
    assert "--- a/k8s/tenants/stanford-like/api-keys.yaml" in out and "kubectl apply -f" in out
    assert "no image rebuild" in out
    # applying what it printed: the rendered Secret's file lets the key in
    data = yaml.safe_load(path.read_text())
    data["institutions"]["stanford-like"]["departments"]["radiology"]["apiKeys"].append(
        {"id": "pacs-2027", "hash": digest})
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    after = load_tenants(path)
    secret = api_keys_secret(after, after.team(STANFORD))["stringData"][KEY_FILE_NAME]
    (tmp_path / KEY_FILE_NAME).write_text(secret)
    assert ApiKeyStore.from_file(tmp_path / KEY_FILE_NAME, STANFORD).authenticate(key).team == STANFORD
    assert run_cli(["tenants", "revoke-key", STANFORD, "pacs-2027", "--tenants", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"hash: {digest}" in out and f"-    - id: pacs-2027\n-      hash: {digest}\n" in out
    assert "Remove from" in out and "id: pacs-2027" in out
    # ids are unique in the whole file (a key names its id), and only departments hold keys
    with pytest.raises(ValueError, match="key id 'radiology-portal' is taken"):
        run_cli(["tenants", "add-key", STANFORD, "--id", "radiology-portal", "--tenants", str(path)])
    with pytest.raises(ValueError, match="local-only team"):
        run_cli(["tenants", "add-key", "demo", "--id", "d1", "--tenants", str(path)])
    with pytest.raises(ValueError, match="no key 'nope'"):
        run_cli(["tenants", "revoke-key", STANFORD, "nope", "--tenants", str(path)])


def test_key_ids_are_unique_across_departments(tenants_file):
    def twice(d):
        d["institutions"]["mayo-like"]["departments"]["radiology"]["apiKeys"][0]["id"] = "radiology-viewer-2026"

    with pytest.raises(ValueError, match=r"mayo-like\.departments\.radiology\.apiKeys\[0\]\.id: "
                                         r"'radiology-viewer-2026' is also .*stanford-like.*unique in the whole file"):
        load_tenants(tenants_file(twice))


# ----------------------------------------------------------------------------------------------
# Credentialed training data; exports into one's own department only
# ----------------------------------------------------------------------------------------------


def entry(*datasets: str, department: str = STANFORD) -> ModelEntry:
    return ModelEntry(department, "m", 1, "/x", {}, {"training_data": [{"dataset": d} for d in datasets],
                                                    "tasks": ["vqa"]})


def test_a_model_of_credentialed_data_is_served_only_to_departments_granted_it(tenants):
    mimic = entry("mimic_cxr", "vqa_rad")
    check_model(mimic, STANFORD, tenants)  # granted mimic_cxr, holds physionet
    for caller, why in ((MAYO, "department 'mayo-like-radiology' is not granted it"),
                        ("mayo-like-cardiology", "not granted it"),  # holds physionet, not granted mimic_cxr
                        (None, "this caller has no department")):
        with pytest.raises(ApiError) as err:
            check_model(mimic, caller, tenants)
        assert err.value.status == 403 and "credentialed dataset 'mimic_cxr'" in err.value.detail, caller
        assert why in err.value.detail
    check_model(entry("mednli"), "mayo-like-cardiology", tenants)
    check_model(entry("vqa_rad", "slake"), None, tenants)  # open data: anyone the app answers
    check_model(entry(), None, tenants)  # a generalist without recorded training data
    with pytest.raises(ApiError, match="access class neither"):
        check_model(entry("made_up_set"), STANFORD, tenants)


def test_registry_export_requires_the_exporters_team_to_own_the_department(tmp_path, tenants, monkeypatch):
    reg = Registry(str(tmp_path / "reg"))
    for team, department, why in ((MAYO, STANFORD, "team 'mayo-like-radiology' does not own it"),
                                  ("demo", STANFORD, "local-only team"),
                                  ("nobody", STANFORD, "not a team of")):
        with pytest.raises(RegistryError, match=why):
            reg.export(tmp_path / "absent", department, "m", team=team, tenants=tenants)
    assert reg.list() == []
    from biomedgpt.cli import main

    monkeypatch.delenv("BIOMEDGPT_TEAM", raising=False)
    code = main(["registry", "export", str(tmp_path / "absent"), "--department", STANFORD, "--name", "m",
                 "--registry", str(tmp_path / "reg")])
    assert code == 2  # no --team and no $BIOMEDGPT_TEAM: refused before anything is read


def test_the_shipped_tenants_file_parses_with_the_new_key_form(tenants):
    for team in tenants.teams.values():
        for k in team.api_keys:
            assert "." not in k.id
            assert not verify_api_key(team.name, f"{k.id}." + "x" * 43, tenants)
    data = yaml.safe_load((REPO / "cluster" / "tenants.yaml").read_text())
    data["datasetSpecs"] = str(REPO / "datasets_spec")
    data["servingSpec"] = str(REPO / "jobs" / "serve" / "cluster.yaml")
    assert tenants_from_dict(data).teams.keys() == tenants.teams.keys()
