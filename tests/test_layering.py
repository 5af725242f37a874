"""The packages form layers, and every import points down:

    moe_rt_app                       (LLM, CLI, benches, the assembly point)
    server   parallel   expert_cache (built on the core; expert_cache also on router_predict)
    router_predict
    moe_rt                           (config, models, layers, engine, kernels, loader)

Every import statement counts, including the ones inside functions (a lazy import is still a
dependency). The test fails on an upward import and on any two packages importing each other.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("moe_rt", "router_predict", "expert_cache", "parallel", "server", "moe_rt_app")
# What each package may import besides itself; anything else of PACKAGES is a violation.
ALLOWED = {
    "moe_rt": set(),
    "router_predict": {"moe_rt"},
    "expert_cache": {"moe_rt", "router_predict"},
    "parallel": {"moe_rt", "router_predict"},
    "server": {"moe_rt"},
    "moe_rt_app": {"moe_rt", "router_predict", "expert_cache", "parallel", "server"},
}


def imports_of(package: str, root: Path = ROOT) -> dict[str, list[str]]:
    """{imported package: ['file:line module', ...]} over every .py file of `package`."""
    found: dict[str, list[str]] = {}
    for path in sorted((root / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in PACKAGES and top != package:
                    found.setdefault(top, []).append(f"{path.relative_to(root)}:{node.lineno} {name}")
    return found


def test_core_imports_nothing_built_on_it():
    assert imports_of("moe_rt") == {}


def test_every_import_points_down():
    bad = {pkg: {dep: sites for dep, sites in imports_of(pkg).items() if dep not in ALLOWED[pkg]}
           for pkg in PACKAGES}
    assert {pkg: deps for pkg, deps in bad.items() if deps} == {}


def test_no_two_packages_import_each_other():
    graph = {pkg: set(imports_of(pkg)) for pkg in PACKAGES}
    assert [(a, b) for a in PACKAGES for b in graph[a] if a < b and a in graph[b]] == []


def test_the_scan_sees_imports_inside_functions(tmp_path):
    # The rule must not be dodged by a lazy import: a function body's import is found.
    (tmp_path / "moe_rt").mkdir()
    (tmp_path / "moe_rt" / "lazy.py").write_text("def f():\n    from expert_cache.install import x\n")
    assert imports_of("moe_rt", tmp_path) == {"expert_cache": ["moe_rt/lazy.py:2 expert_cache.install"]}
