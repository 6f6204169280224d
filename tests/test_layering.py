"""The import order of DESIGN.md, checked over the import graph of every module in the five packages:
twinfer -> simulator, traces, analysis -> engine; engine imports none of the others; traces reads and
transforms traces only; analysis imports only engine; nothing imports twinfer but twinfer."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("twinfer", "simulator", "traces", "analysis", "engine")
ALLOWED = {
    "twinfer": {"twinfer", "simulator", "traces", "analysis", "engine"},
    "simulator": {"simulator", "traces", "analysis", "engine"},
    "analysis": {"analysis", "engine"},
    "traces": {"traces"},
    "engine": {"engine"},
}


def imported_packages(path: Path) -> set[tuple[str, int]]:
    """(top-level package, line) of every import of one of PACKAGES in a module, lazy imports included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found.update((name.split(".")[0], node.lineno) for name in names if name.split(".")[0] in PACKAGES)
    return found


def test_imports_run_downwards_only():
    violations = []
    for package, allowed in ALLOWED.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            for imported, line in sorted(imported_packages(path)):
                if imported not in allowed:
                    violations.append(f"{path.relative_to(ROOT)}:{line} imports {imported}")
    assert not violations, "imports against DESIGN.md's order:\n" + "\n".join(violations)


def test_the_checker_sees_lazy_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from simulator.cluster import x\n    import twinfer.cli\n")
    assert imported_packages(module) == {("simulator", 2), ("twinfer", 3)}
