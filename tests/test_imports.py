"""The package's imports flow one way: no cycle among its modules, and a function-local import
only for a heavy or optional dependency, with its reason on the line. The train step, the
samplers and the DyDiT engine call jax.jit as configured, with no machine-specific tuning."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "dydit_jax"

# Imported inside functions on purpose: heavy (TensorFlow, torch, scikit-learn, TensorBoard's
# protos) or optional (safetensors, filelock, libtpu's topologies, the checkout's configs/)
# dependencies.
LAZY_OK = (
    "tensorflow", "tensorflow_datasets", "google.protobuf", "torch", "safetensors", "sklearn",
    "tensorboard", "filelock", "jax.experimental.topologies", "configs",
)


def lazy_ok(node: ast.Import | ast.ImportFrom) -> bool:
    if getattr(node, "level", 0):
        return False
    if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
    else:
        targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return any(t == ok or t.startswith(ok + ".") for t in targets for ok in LAZY_OK)


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


def sources() -> dict[str, list[str]]:
    return {module_name(p): p.read_text().splitlines() for p in sorted(PACKAGE.rglob("*.py"))}


def imported(node: ast.Import | ast.ImportFrom, here: str, known: set[str]) -> set[str]:
    """The package modules an import statement loads (`from pkg import mod` counts mod)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in known}
    base = node.module or ""
    if node.level:  # relative: from the package that holds `here`
        package = here.split(".")
        if not (PACKAGE / pathlib.Path(*package[1:]) / "__init__.py").exists():
            package = package[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join(package + ([base] if base else []))
    submodules = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known}
    # `from pkg import submodule` needs the submodule; any other name needs pkg itself
    whole = base in known and len(submodules) < len(node.names)
    return submodules | ({base} if whole else set())


def function_imports(tree: ast.Module):
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for sub in ast.walk(node):
                if isinstance(sub, ast.Import | ast.ImportFrom):
                    yield sub


def import_graph() -> dict[str, set[str]]:
    trees = modules()
    known = set(trees)
    graph = {}
    for name, tree in trees.items():
        local = set(map(id, function_imports(tree)))
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in local:
                edges |= imported(node, name, known)
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_among_the_package_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_function_local_imports_are_only_heavy_optional_dependencies_with_a_reason():
    offenders = []
    text = sources()
    for name, tree in modules().items():
        for node in function_imports(tree):
            target = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
            if not lazy_ok(node):
                offenders.append(f"{name}:{node.lineno} imports {target or '.'}")
            lines = text[name][node.lineno - 2: node.end_lineno]
            if not any("#" in line for line in lines):
                offenders.append(f"{name}:{node.lineno} imports {target} without a reason")
    assert not offenders, offenders


@pytest.mark.parametrize("module", ["dydit_jax.update_step", "dydit_jax.sample_lib",
                                    "dydit_jax.dynamic.engine", "dydit_jax.train_lib"])
def test_the_program_paths_import_no_machine_tuning(module):
    graph = import_graph()
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph.get(m, ()))
    assert not {m for m in seen if m.split(".")[-1] in ("hugepages", "xla_cpu")}, seen
