"""Import rules of the library, read from the source with :mod:`ast` (module-level and
function-level imports alike; nothing is imported).

- the core of ``probe/`` (everything but :data:`ORCHESTRATION`) never imports ``attacks``,
  ``defenses`` or ``viz``: attacks and defenses build on the core, and only the orchestration
  modules bring them together;
- ``attacks/`` never imports ``defenses`` and ``defenses/`` never imports ``attacks``;
- ``viz/`` never imports torch, nnsight or transformers (it draws results, it never runs a model);
- ``probe.model`` (the model loader) never reaches ``probe.vlm``, directly or through other core
  modules: ``probe.vlm`` registers its loaders with ``probe.model``, never the reverse;
- no library module names a path into the development folder (``../shared``).
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = ("probe", "attacks", "defenses", "viz")

#: Modules of ``probe/`` allowed to import ``attacks``, ``defenses`` and ``viz``: the orchestration
#: (the command line and the ``probe.jobs`` package, where attacks and defenses meet). Entries ending in
#: ``/`` cover a whole subpackage. Everything else in ``probe/`` is the core.
ORCHESTRATION = ("probe/cli.py", "probe/jobs/")

#: Top-level packages ``viz/`` must never import.
VIZ_FORBIDDEN = ("torch", "nnsight", "transformers")

#: Text that would point library code into the development folder next to the repository.
DEV_FOLDER_MARKERS = ("../shared", "shared/data", "shared/docs")


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


@lru_cache(maxsize=None)
def imports_of(path: Path) -> frozenset[str]:
    """Absolute dotted names a file imports, at any depth of its syntax tree. For ``from X import
    y`` both ``X`` and ``X.y`` are listed (``y`` may be a submodule); relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names if a.name != "*")
    out.discard("")
    return frozenset(out)


def _top(name: str) -> str:
    return name.split(".")[0]


def _is_orchestration(path: Path) -> bool:
    rel = _rel(path)
    return any(rel == o or (o.endswith("/") and rel.startswith(o)) for o in ORCHESTRATION)


def _violations(paths, forbidden) -> list[str]:
    return [f"{_rel(p)} imports {name}" for p in paths for name in sorted(imports_of(p))
            if _top(name) in forbidden]


def test_the_files_are_found():
    for package in LIBRARY:
        assert _files(package), package
    assert (ROOT / "probe" / "model.py").is_file() and (ROOT / "probe" / "vlm" / "__init__.py").is_file()
    assert "probe.facts" in imports_of(ROOT / "probe" / "vlm" / "image_facts.py")  # relative imports resolved


def test_probe_core_imports_no_attacks_defenses_or_viz():
    core = [p for p in _files("probe") if not _is_orchestration(p)]
    assert len(core) > 10
    assert _violations(core, {"attacks", "defenses", "viz"}) == []


def test_attacks_and_defenses_do_not_import_each_other():
    assert _violations(_files("attacks"), {"defenses"}) == []
    assert _violations(_files("defenses"), {"attacks"}) == []


def test_viz_never_imports_torch():
    assert _violations(_files("viz"), set(VIZ_FORBIDDEN)) == []


def _probe_module_file(name: str) -> Path | None:
    parts = name.split(".")
    for candidate in (ROOT.joinpath(*parts).with_suffix(".py"), ROOT.joinpath(*parts, "__init__.py")):
        if candidate.is_file():
            return candidate
    return None


def test_model_loader_does_not_reach_vlm():
    """Walk probe.model's imports inside ``probe`` (transitively, package __init__ files aside:
    ``import probe`` imports probe.vlm last, on purpose); none may be probe.vlm."""
    seen, todo, reached = set(), ["probe.model"], []
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = _probe_module_file(name)
        if path is None:
            continue
        for dep in imports_of(path):
            if dep == "probe.vlm" or dep.startswith("probe.vlm."):
                reached.append(f"{_rel(path)} imports {dep}")
            elif _top(dep) == "probe" and dep != "probe":
                todo.append(dep)
    assert "probe.arch" in seen  # the walk does follow probe.model's imports
    assert reached == []


@pytest.mark.parametrize("package", LIBRARY)
def test_no_library_path_into_the_development_folder(package):
    bad = []
    for path in _files(package):
        text = path.read_text(encoding="utf-8")
        bad += [f"{_rel(path)}: {m}" for m in DEV_FOLDER_MARKERS if m in text]
        for node in ast.walk(ast.parse(text)):  # e.g. Path(__file__).parents[2] / "shared"
            if isinstance(node, ast.Constant) and node.value == "shared":
                bad.append(f"{_rel(path)}:{node.lineno}: the path component 'shared'")
    assert bad == []


def test_ray_is_imported_only_by_the_sharded_grid_inside_a_function():
    """Ray is an optional extra: only ``probe/jobs/shard.py`` imports it, and only inside a function
    (called when ``--workers`` / ``--ray-address`` is given), so ``import probe.jobs`` works without it."""
    users = [_rel(p) for package in LIBRARY for p in _files(package) if "ray" in {_top(n) for n in imports_of(p)}]
    assert users == ["probe/jobs/shard.py"]
    tree = ast.parse((ROOT / "probe/jobs/shard.py").read_text(encoding="utf-8"))
    top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not [n for n in top_level for a in n.names if _top(getattr(n, "module", None) or a.name) == "ray"]
