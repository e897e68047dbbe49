"""The import graph of dp_attn (docs/design.md §2): no cycle, and no arrow pointing up the
stack. Read from the source with ast, imports inside functions included (a deferred import is
still a dependency)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dp_attn"

# Each unit (a top-level module or subpackage of dp_attn) may import units of a lower level
# and its own modules, nothing else. The root, dp_attn/__init__.py, is the facade above all.
LEVELS = {
    "checks": 0,
    "accounting": 1,
    "kernels": 1,
    "functional": 2,
    "nn": 3,
    "optimizer": 3,
    "sampling": 3,
    "integrations": 4,
    "clipping": 5,
    "conversion": 5,
    "engine": 6,
    "audit": 7,
    "distributed": 7,
    "demo": 7,
    "selfcheck": 7,
    "cli": 8,
}


def module_name(path: Path) -> str:
    parts = ("dp_attn", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    return {name: {d for d, _ in imports} for name, imports in imported_names().items()}


def imported_names() -> dict[str, set[tuple[str, str]]]:
    """{module: {(the dp_attn module it imports from, the name imported ("" for a module))}}."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:  # `from pkg import submodule` depends on the submodule
                    target = f"{source}.{alias.name}"
                    deps.add((target, "") if target in modules else (source, alias.name))
            elif isinstance(node, ast.Import):
                deps.update((alias.name, "") for alias in node.names)
        graph[name] = {(d, n) for d, n in deps if d in modules and d != name}
    return graph


def unit(module: str) -> str:
    return module.split(".")[1] if module != "dp_attn" else ""


def test_the_graph_is_read():
    graph = import_graph()
    assert "dp_attn.functional" in graph["dp_attn.engine"]
    assert "dp_attn.kernels.clipped_sum" in graph["dp_attn.functional"]
    assert "dp_attn.engine" in graph["dp_attn.audit.one_run"]  # a deferred import counts


def test_every_unit_has_a_level():
    units = {unit(m) for m in import_graph()} - {""}
    assert units == set(LEVELS), f"give these units a level: {sorted(units ^ set(LEVELS))}"


def test_no_import_points_up_the_stack():
    upward = [
        f"{m} -> {d}"
        for m, deps in import_graph().items()
        for d in deps
        if m != "dp_attn"
        and unit(d) != unit(m)
        and (d == "dp_attn" or LEVELS[unit(d)] >= LEVELS[unit(m)])
    ]
    assert not upward, f"imports that point up (or sideways) the stack: {upward}"


def test_no_import_cycle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                cycle = [*path[path.index(dep) :], dep]  # dep is on the path: a back edge
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if dep not in state:
                visit(dep, [*path, dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_no_private_name_crosses_units():
    """A leading underscore is private to its unit: its package's modules may share it."""
    crossing = [
        f"{m} imports {n} from {d}"
        for m, imports in imported_names().items()
        for d, n in imports
        if n.startswith("_") and n != "__version__" and unit(d) != unit(m)
    ]
    assert not crossing, f"private names imported from another unit: {crossing}"
