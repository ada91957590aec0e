"""tests/fixtures/ is what its README and SHA256SUMS say: every file described, every checksum right."""

from __future__ import annotations

import hashlib
import re

from fixture_files import FIXTURES, fixture, packed_name

UNLISTED = {"README.md", "SHA256SUMS", "make_fixtures.py", "ofa/README.md"}


def stored_files() -> list[str]:
    return sorted(p.relative_to(FIXTURES).as_posix() for p in FIXTURES.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts)


def test_every_fixture_matches_its_checksum():
    sums = dict(reversed(line.split("  ", 1)) for line in (FIXTURES / "SHA256SUMS").read_text().splitlines())
    logical = sorted(packed_name(rel)[0] for rel in stored_files() if rel not in UNLISTED)
    assert logical == sorted(sums), "SHA256SUMS and the files differ: rerun make_fixtures.py"
    for name in logical:
        assert hashlib.sha256(fixture(name).read_bytes()).hexdigest() == sums[name], name


def test_readme_describes_every_fixture():
    readme = (FIXTURES / "README.md").read_text()
    undescribed = []
    for rel in stored_files():
        if rel in UNLISTED:
            continue
        folder, _, name = rel.rpartition("/")
        stem = packed_name(name)[0].split(".")[0]
        # a file is described when the README names it, or its folder with its stem (crds/, image folders)
        token = re.escape(stem.split("_")[0])
        if f"`{rel}`" not in readme and not (f"`{folder}/" in readme and re.search(rf"\b{token}\b", readme)):
            undescribed.append(rel)
    assert not undescribed, f"tests/fixtures/README.md does not describe {undescribed}"
