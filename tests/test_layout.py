"""The package's layering: imports go down the data flow only (apps -> runtime -> model -> processing), and no
module imports itself back through others (no cycles). Read from the source with ast (nothing is executed), imports
inside functions included: a deferred import hides a cycle, it does not remove it. `if TYPE_CHECKING:` blocks are
skipped (they never run)."""

import ast
import os
import textwrap
from typing import Dict, List, Optional, Set, Tuple

import pytest

PACKAGE = os.path.join(os.path.dirname(__file__), os.pardir, "glm4v_ms")

# Rank of each stage: a module may import modules of its own rank or lower. The base modules (version, progress)
# import nothing from the package and may be imported by all. The package root is the public API: it may import
# everything, and nothing inside the package may import it.
RANKS = {"_version": 0, "progress": 0, "processing": 1, "model": 2, "runtime": 3, "apps": 4}
ROOT_RANK = 99
LONG_MODULE_LINES = 450
LONG_MODULE_REASON = "Why this module is long:"


def _modules(root: str, pkg: str) -> Dict[str, str]:
    """{dotted module name: file path} of every .py file under ``root``."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            if not f.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), root)[:-3].split(os.sep)
            if rel[-1] == "__init__":
                rel = rel[:-1]
            out[".".join([pkg] + rel)] = os.path.join(dirpath, f)
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every Import / ImportFrom node, at any depth, outside `if TYPE_CHECKING:` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _imports_of(name: str, path: str, modules: Dict[str, str], pkg: str) -> List[Tuple[str, int]]:
    """(imported package module, line) pairs of module ``name``."""
    is_pkg = os.path.basename(path) == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
    out = []
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            if node.level:
                base = here[:len(here) - node.level + 1] if node.level > 1 else here
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import sub` names a module when pkg.sub is one
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
        for t in targets:
            while t and t not in modules:  # `import glm4v_ms.model.ops.x` -> the longest known module
                t = t.rpartition(".")[0]
            if t and (t == pkg or t.startswith(pkg + ".")) and t != name:
                out.append((t, node.lineno))
    return out


def _rank(name: str, pkg: str) -> int:
    if name == pkg:
        return ROOT_RANK
    return RANKS[name.split(".")[1]]


def layering_problems(root: str, pkg: str = "glm4v_ms") -> List[str]:
    """Upward imports, imports of the package root from inside, modules outside every stage, and import cycles,
    each named by its edge (file:line)."""
    modules = _modules(root, pkg)
    graph: Dict[str, List[Tuple[str, int]]] = {}
    problems = []
    for name, path in sorted(modules.items()):
        if name != pkg and name.split(".")[1] not in RANKS:
            problems.append(f"{name} belongs to no stage (known: {sorted(RANKS)})")
            continue
        graph[name] = _imports_of(name, path, modules, pkg)
        for target, line in graph[name]:
            if name != pkg and target == pkg:
                problems.append(f"{name} -> {pkg} ({os.path.relpath(path, root)}:{line}): the public API is the "
                                f"top; import the module that defines the name")
            elif target in modules and target.split(".")[1:2] and target.split(".")[1] not in RANKS:
                continue  # reported above
            elif _rank(target, pkg) > _rank(name, pkg):
                problems.append(f"{name} -> {target} ({os.path.relpath(path, root)}:{line}): upward import "
                                f"({name.split('.')[1]} may not import {target.split('.')[1]})")
    cycle = _find_cycle(graph)
    if cycle:
        problems.append("import cycle: " + " -> ".join(cycle))
    return problems


def _find_cycle(graph: Dict[str, List[Tuple[str, int]]]) -> Optional[List[str]]:
    state: Dict[str, int] = {}  # 1 on the stack, 2 done
    path: List[str] = []

    def visit(n: str) -> Optional[List[str]]:
        state[n] = 1
        path.append(n)
        for m, _ in graph.get(n, []):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        path.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_package_layers_and_no_cycles():
    problems = layering_problems(PACKAGE)
    assert not problems, "layering broken:\n  " + "\n  ".join(problems)


def test_long_modules_say_why():
    long = []
    for name, path in _modules(PACKAGE, "glm4v_ms").items():
        src = open(path, encoding="utf-8").read()
        if src.count("\n") > LONG_MODULE_LINES:
            doc = ast.get_docstring(ast.parse(src)) or ""
            if LONG_MODULE_REASON not in doc:
                long.append(f"{name} ({src.count(chr(10))} lines)")
    assert not long, (f"modules over {LONG_MODULE_LINES} lines without '{LONG_MODULE_REASON}' in their docstring "
                      f"(split them by concern, or say why not): {long}")


def _tree(tmp_path, files: Dict[str, str]) -> str:
    root = tmp_path / "pkg"
    for rel, src in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(src))
    for d in {os.path.dirname(r) for r in files} | {""}:
        init = root / d / "__init__.py"
        if not init.exists():
            init.write_text("")
    return str(root)


def test_checker_finds_upward_deferred_import(tmp_path):
    root = _tree(tmp_path, {
        "model/net.py": """
            def generate():
                from ..runtime.loop import run  # deferred, still upward
                return run
        """,
        "runtime/loop.py": "from ..model import net\n",
    })
    problems = layering_problems(root, "pkg")
    assert any("pkg.model.net -> pkg.runtime.loop" in p and "upward" in p and "net.py:3" in p for p in problems), problems
    assert any(p.startswith("import cycle:") for p in problems), problems


def test_checker_finds_same_layer_cycle_and_skips_type_checking(tmp_path):
    root = _tree(tmp_path, {
        "model/a.py": "from .b import x\n",
        "model/b.py": "def f():\n    from . import a\n",
        "model/c.py": """
            from typing import TYPE_CHECKING
            if TYPE_CHECKING:
                from ..apps.tool import T
        """,
        "apps/tool.py": "from ..model import c\n",
        "processing/p.py": "import pkg\n",
    })
    problems = layering_problems(root, "pkg")
    cycles = [p for p in problems if p.startswith("import cycle:")]
    assert cycles and "pkg.model.a" in cycles[0] and "pkg.model.b" in cycles[0], problems
    assert not any("pkg.model.c ->" in p for p in problems), problems
    assert any("pkg.processing.p -> pkg " in p for p in problems), problems


@pytest.mark.parametrize("module", ["glm4v_ms.model.glm4v", "glm4v_ms.runtime.generation"])
def test_cycle_of_the_first_round_is_gone(module):
    """model -> generation -> engine -> parallel -> model was the first round's cycle."""
    modules = _modules(PACKAGE, "glm4v_ms")
    targets = {t for t, _ in _imports_of(module, modules[module], modules, "glm4v_ms")}
    if module == "glm4v_ms.model.glm4v":
        assert not any(t.startswith("glm4v_ms.runtime") for t in targets), targets
    else:
        assert "glm4v_ms.model.parallel" in targets  # downward use is fine
