"""The shape of the code, checked: what import-linter cannot see (the layers themselves are its contracts in
pyproject.toml, run by `make lint` and `make test`)."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "aimv2"
FILES = sorted(SRC.rglob("*.py"))
MAX_LINES = 400
# the library's modules: parallelism is applied from outside them (train/parallelize.py, train/distributed.py)
NO_DISTRIBUTED = ("models", "objectives", "data", "weights", "eval")


def _imports(path: Path):
    """(level, module, names) of every import in the file, function-level ones included."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            yield node.level, node.module or "", [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield 0, a.name, []


def _module(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    """aimv2 module -> the aimv2 modules it imports (a name imported from a package counts as its submodule when
    there is one, else as the package)."""
    modules = {_module(p): p for p in FILES}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = set()
        for level, module, names in _imports(path):
            if level:
                base = package.split(".")[: len(package.split(".")) - level + 1]
                module = ".".join(base + ([module] if module else []))
            for candidate in [f"{module}.{n}" for n in names] + [module]:
                if candidate in modules and candidate != name:
                    graph[name].add(candidate)
                    break
    return graph


def test_sources_exist():
    assert len(FILES) > 40


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_private_name_is_imported_across_modules(path):
    private = [
        f"{'.' * level}{module}: {name}"
        for level, module, names in _imports(path)
        if level or module.startswith("aimv2")
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert not private, f"{path.relative_to(SRC)} imports private names {private}: make them public in one place"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_source_files_stay_small(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(SRC)} has {n} lines; split it by what it holds"


@pytest.mark.parametrize("package", NO_DISTRIBUTED)
def test_library_packages_use_no_torch_distributed(package):
    found = [
        f"{path.relative_to(SRC)}: {module}"
        for path in sorted((SRC / package).rglob("*.py"))
        for level, module, _ in _imports(path)
        if not level and module.startswith("torch.distributed")
    ]
    assert not found, found


def test_modules_import_each_other_without_a_cycle():
    """No module imports, directly or through others, a module that imports it (lazy imports included)."""
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
    assert "aimv2.objectives.base" in graph["aimv2.train.trainer"]


def test_the_checks_can_fail(tmp_path):
    """The private-import and distributed checks see what they look for."""
    bad = tmp_path / "bad.py"
    bad.write_text("from .loop import _clip\nimport torch.distributed as dist\n")
    imports = list(_imports(bad))
    assert (1, "loop", ["_clip"]) in imports and (0, "torch.distributed", []) in imports
