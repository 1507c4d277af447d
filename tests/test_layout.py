"""The house rules of the code (docs/design.md, "Layout"), checked from the source itself.

Folders are stages and data flow one way; no import cycles (imports inside functions count);
no function longer than a screen; modules that read in one sitting; the simulated archive
shares only the instrument facts with the client; no module shadows a public function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "spxframe"
MAX_FUNCTION_LINES = 100  # without the docstring
MAX_MODULE_LINES = 500  # outside sim/
#: stage → stages it may import (besides the shared base: spherex, schema, errors, fits, catalog, sizes, store)
BASE = {"spherex", "schema", "errors", "fits", "catalog", "sizes", "store", "progress", "mpl", "_version"}
MAY_IMPORT = {
    "fits": set(),
    "archive": set(),
    "planner": {"archive"},
    "fetcher": set(),
    "photometry": set(),
    "science": set(),
    "run": {"archive", "planner", "fetcher", "photometry", "science", "plot"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(ROOT.rglob("*.py")):
        parts = ["spxframe", *p.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every spxframe module ``name`` imports, at any depth of its code."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in MODULES and t != name}
    return out


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _stage(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_import_cycles():
    color: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        color[m] = 1
        for n in sorted(GRAPH[m]):
            if color.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n] if n in stack else [m, n])
            elif not color.get(n):
                visit(n, stack + [n])
        color[m] = 2

    for m in sorted(GRAPH):
        if not color.get(m):
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_data_flows_one_way():
    wrong = []
    for mod, deps in GRAPH.items():
        stage = _stage(mod)
        if stage not in MAY_IMPORT:
            continue
        for d in deps:
            other = _stage(d)
            if other != stage and other not in BASE and other not in MAY_IMPORT[stage]:
                wrong.append(f"{mod} imports {d}")
    assert not wrong, wrong


def test_nothing_imports_run_but_the_public_face():
    allowed = {"spxframe", "spxframe.cli", "spxframe.demo"}
    wrong = [f"{m} imports {d}" for m, deps in GRAPH.items() for d in deps
             if _stage(d) == "run" and _stage(m) != "run" and m not in allowed]
    assert not wrong, wrong


def test_sim_shares_only_the_instrument_facts():
    wrong = [f"{m} imports {d}" for m, deps in GRAPH.items() if _stage(m) == "sim"
             for d in deps if _stage(d) not in ("sim", "spherex")]
    assert not wrong, wrong


def test_base_modules_import_no_stage():
    wrong = [f"{m} imports {d}" for m, deps in GRAPH.items() if _stage(m) in BASE
             for d in deps if _stage(d) not in BASE]
    assert not wrong, wrong


def _function_lengths(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                    and isinstance(body[0].value.value, str):
                n -= body[0].end_lineno - body[0].lineno + 1
            yield node.name, node.lineno, n


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_functions_fit_on_a_screen(mod):
    long = [(name, line, n) for name, line, n in _function_lengths(MODULES[mod]) if n > MAX_FUNCTION_LINES]
    assert not long, f"{MODULES[mod]}: functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_modules_read_in_one_sitting():
    long = {m: n for m, p in MODULES.items() if _stage(m) != "sim"
            and (n := len(p.read_text().splitlines())) >= MAX_MODULE_LINES}
    assert not long, long


def test_no_module_shadows_a_public_function():
    import spxframe

    names = {n for n in spxframe.__all__ if n not in ("errors", "__version__")}
    shadows = sorted(n for n in names if f"spxframe.{n}" in MODULES)
    assert not shadows, shadows


def test_facts_written_once():
    """The FITS block size and the QR2 file size are written in spherex.py only."""
    wrong = []
    for m, p in MODULES.items():
        if m == "spxframe.spherex":
            continue
        for i, line in enumerate(p.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if any(lit in code for lit in ("= 2880", "(2880", " 2880)", "71_634_240", "71634240")):
                wrong.append(f"{p.name}:{i}: {line.strip()}")
    assert not wrong, wrong
