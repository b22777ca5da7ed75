"""The data package's layering, read from its source: it imports nothing above it (train, eval, commands, no
torch.distributed), no private name of another module, and its modules import each other without a cycle."""

import ast
from pathlib import Path

import aimv2.data

DATA = Path(aimv2.data.__file__).parent
ALLOWED = ("aimv2.data", "aimv2.config", "aimv2.models")


def _module(path: Path) -> str:
    parts = path.relative_to(DATA.parent.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(absolute module, imported names) of every import in the file, function-level ones included."""
    package = _module(path) if path.name == "__init__.py" else _module(path).rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            out.append((name, [a.name for a in node.names]))
    return out


def _graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in DATA.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        graph[name] = set()
        for target, names in _imports(path):
            for candidate in [f"{target}.{n}" for n in names] + [target]:
                if candidate in modules and candidate != name:
                    graph[name].add(candidate)
                    break
    return graph


def test_data_imports_nothing_above_it_and_no_private_names():
    for path in DATA.rglob("*.py"):
        for target, names in _imports(path):
            assert not target.startswith("aimv2") or target.startswith(ALLOWED), (path.name, target)
            assert not target.startswith("torch.distributed"), (path.name, target)
            if target.startswith("aimv2"):
                assert not [n for n in names if n.startswith("_")], (path.name, target, names)


def test_data_modules_import_each_other_without_a_cycle():
    graph, done, stack = _graph(), set(), []

    def visit(node: str) -> None:
        assert node not in stack, "import cycle: " + " -> ".join([*stack[stack.index(node) :], node])
        if node in done:
            return
        stack.append(node)
        for nxt in sorted(graph[node]):
            visit(nxt)
        stack.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)
    assert "aimv2.data.synthetic.vocabulary" in graph["aimv2.data.synthetic.captions"]  # the graph is really read
