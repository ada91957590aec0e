"""ARCHITECTURE.md stays true: every room of platform/biomedgpt imports only the rooms its table row
allows, no import cycle joins the package's modules, and no code outside tasks/ branches on a task's
name. Imports inside functions count: they are dependencies too."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests_paths import REPO

PKG = REPO / "platform" / "biomedgpt"
TASK_NAMES = {"vqa", "caption", "captioning", "classify", "classification", "nli", "summarize", "summarization",
              "multi_label", "pretrain"}


def modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts)
        out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules `name` imports (anywhere in the file), resolved to the deepest known module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                if path.name == "__init__.py":
                    base.append("__init__")
                base = base[: len(base) - node.level]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        for cand in candidates:
            while cand and cand not in known:
                cand = cand.rsplit(".", 1)[0] if "." in cand else ""
            if cand and cand != name:
                found.add(cand)
    return found


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def allowed_imports() -> dict[str, set[str]]:
    text = (REPO / "ARCHITECTURE.md").read_text(encoding="utf-8")
    table = {}
    for row in re.findall(r"^\| `(\w+)` \|.*\| (.*) \|$", text, flags=re.M):
        name, allowed = row
        table[name] = set(re.findall(r"`(\w+)`", allowed))
    return table


def test_every_room_is_in_the_map_and_imports_only_what_it_may():
    known = modules()
    table = allowed_imports()
    rooms = {room(m) for m in known if room(m)}
    assert rooms == set(table), f"rooms missing from ARCHITECTURE.md: {sorted(rooms - set(table))}; " \
                                f"rows without a room: {sorted(set(table) - rooms)}"
    wrong = []
    for mod, path in known.items():
        src = room(mod)
        if not src:
            continue
        for dep in imports(mod, path, known):
            dst = room(dep)
            if dst and dst != src and dst not in table[src]:
                wrong.append(f"{mod} imports {dep} ({src} -> {dst} is not in ARCHITECTURE.md)")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles_between_modules():
    known = modules()
    edges = {m: imports(m, p, known) for m, p in known.items()}
    for m, p in known.items():  # a package's face re-exports its members: those edges are not cycles
        if p.name == "__init__.py":
            edges[m] = {d for d in edges[m] if not d.startswith(m + ".")}
        edges[m] = {d for d in edges[m] if not (known[d].name == "__init__.py" and m.startswith(d + "."))}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_branches_on_task_names_outside_tasks():
    branches = []
    for mod, path in modules().items():
        if room(mod) == "tasks":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Compare) or "task" not in ast.unparse(node.left).lower():
                continue
            names = []
            for side in [node.left, *node.comparators]:
                if isinstance(side, ast.Constant) and isinstance(side.value, str):
                    names.append(side.value)
                if isinstance(side, (ast.Tuple, ast.Set, ast.List)):
                    names += [e.value for e in side.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
            if TASK_NAMES & set(names):
                branches.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
    assert not branches, "task knowledge outside tasks/ (ask the task instead):\n" + "\n".join(branches)
