"""The package's import graph, read from the source with ast (nothing is imported): no cycles,
the session layer imports nothing above it, and a job's stages never import a later stage.

Every import counts, at module level or inside a function: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "spd_cluster"

# A job's way (docs/architecture.md): each stage may import the ones before it, never a later one.
STAGES = ["spd_cluster.config", "spd_cluster.cluster.preflight", "spd_cluster.cluster.plan",
          "spd_cluster.cluster.schedule", "spd_cluster.cluster.commit", "spd_cluster.cluster.finish",
          "spd_cluster.cluster.coordinator"]


def modules(root: Path = PKG) -> dict[str, Path]:
    out = {}
    for p in sorted(root.rglob("*.py")):
        parts = p.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports (``from .x import y`` counts ``.x.y`` where that
    is a module, else ``.x``)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package[: len(package) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for t in targets:
            while t and t not in known and "." in t:
                t = t.rsplit(".", 1)[0]
            if t in known and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
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
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def reachable(g: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in g[todo.pop()]:
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def test_the_reader_sees_relative_lazy_and_package_imports(tmp_path):
    """The checks below are only as good as the reader: it must see imports inside functions,
    relative ones at any depth, and ``from package import module``."""
    pkg = tmp_path / "p"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("")
    (pkg / "a" / "x.py").write_text("def f():\n    from ..b import y\n")
    (pkg / "b.py").write_text("from .a import x\nimport os\n")
    (pkg / "y.py").write_text("from p.a.x import f\n")
    known = modules(pkg)
    g = {n: imports_of(n, p, known) for n, p in known.items()}
    assert g["p.a.x"] == {"p.b"} and g["p.b"] == {"p.a.x"} and g["p.y"] == {"p.a.x"}
    assert cycles(g) == [["p.a.x", "p.b"]]


def test_no_import_cycles_in_the_package():
    assert cycles(graph()) == []


def test_sessions_import_nothing_above_them():
    g = graph()
    up = {m: sorted(d for d in deps if d.startswith(("spd_cluster.engine", "spd_cluster.cluster")))
          for m, deps in g.items() if m.startswith("spd_cluster.sessions")}
    assert {m: d for m, d in up.items() if d} == {}


def test_a_stage_never_imports_a_later_stage():
    """Directly or through any module between them."""
    g = graph()
    assert all(s in g for s in STAGES), [s for s in STAGES if s not in g]
    bad = {}
    for i, stage in enumerate(STAGES):
        later = set(STAGES[i + 1:]) & (reachable(g, stage) - {stage})
        if later:
            bad[stage] = sorted(later)
    assert bad == {}


def _calls_outside(package_dirs: tuple[str, ...]):
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        if not rel.startswith(package_dirs):
            yield rel, ast.parse(path.read_text(), rel)


def test_roles_are_asked_of_the_registry_not_compared_as_strings():
    """Which actors a pair has, and what each loads, is the mode registry's (engine/modes.py:
    Mode.roles, loads_heads; JobConfig.roles()): the cluster layer compares no role strings."""
    found = []
    for rel, tree in _calls_outside(("sessions/", "engine/", "training/")):
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                for side in [node.left, *node.comparators]:
                    if isinstance(side, ast.Constant) and side.value in ("target", "draft"):
                        found.append(f"{rel}:{node.lineno}")
    assert found == []




def test_modes_are_asked_of_the_registry_not_compared_as_strings():
    """What a mode does (a draft, heads, a job-wide cache, speculation at all) is its Mode's in
    engine/modes.py: no other module compares a mode's name ("draft" is a role too: the test
    above)."""
    from spd_cluster.engine.modes import MODES

    names = set(MODES) - {"draft"}
    found = []
    for rel, tree in _calls_outside(("engine/modes.py",)):
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                found += [f"{rel}:{node.lineno}" for side in [node.left, *node.comparators]
                          if isinstance(side, ast.Constant) and side.value in names]
    assert found == []


def test_a_session_call_is_built_by_its_type():
    """The session contract's inputs are assembled in one place (sessions/base.SessionCall)."""
    found = []
    for rel, tree in _calls_outside(("sessions/",)):
        for node in ast.walk(tree):
            if isinstance(node, ast.Dict) and any(isinstance(k, ast.Constant) and k.value == "batch_index"
                                                  for k in node.keys):
                found.append(rel)
    assert found == []
