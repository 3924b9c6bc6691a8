"""The package structure the code relies on: imports run one way, routers are named in one place,
generation goes through the model's one forward walk, and commands share one shape."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Dict, List, Set

from conftest import REPO

PACKAGE = REPO / "mindformers_sigma"


def _unit(path: Path) -> str:
    """The package (or top-level module) a source file belongs to: ``training``, ``config``..."""
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imported_units(path: Path) -> Set[str]:
    """Every unit of the project a file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        modules = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules = [node.module] if node.module != "mindformers_sigma" else \
                [f"mindformers_sigma.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        found |= {module.split(".")[1] for module in modules if module.startswith("mindformers_sigma.")}
    return found


def import_graph() -> Dict[str, Set[str]]:
    graph: Dict[str, Set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        unit = _unit(path)
        graph.setdefault(unit, set()).update(_imported_units(path) - {unit, "__version__"})
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one unit (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    found: List[List[str]] = []

    def visit(unit: str) -> None:
        index[unit] = low[unit] = len(index)
        stack.append(unit)
        for other in sorted(graph.get(unit, ())):
            if other not in index:
                visit(other)
                low[unit] = min(low[unit], low[other])
            elif other in stack:
                low[unit] = min(low[unit], index[other])
        if low[unit] == index[unit]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == unit:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for unit in sorted(graph):
        if unit not in index:
            visit(unit)
    return found


def test_no_package_imports_a_package_that_imports_it_back():
    graph = import_graph()
    assert {"model", "moe", "training", "parallel", "checkpoint", "generation"} <= set(graph)
    assert cycles(graph) == []
    # the check itself finds a cycle when there is one
    assert cycles(dict(graph, model=graph["model"] | {"training"})) != []


def test_routers_are_named_only_by_the_config_and_the_router_module():
    comparison = re.compile(r"router\s*[!=]=|==\s*[\"'](rre|switch|gshard)[\"']|[\"'](rre|switch|gshard)[\"']\s*[!=]=")
    offenders = [f"{path.relative_to(REPO)}:{number}" for path in PACKAGE.rglob("*.py")
                 if path.relative_to(PACKAGE).as_posix() not in ("config.py", "moe/router.py")
                 for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                 if comparison.search(line)]
    assert offenders == []


def test_generation_goes_through_the_models_forward_walk():
    """Decoding calls the model (``next_token_logits``), never the backbone's parts."""
    reaching_in = re.compile(r"backbone|\.layers\b|final_norm|top_query|embedding_table|\.attention\b")
    offenders = [f"{path.name}:{number}" for path in (PACKAGE / "generation").glob("*.py")
                 for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                 if reaching_in.search(line.split("#")[0])]
    assert offenders == []


def test_every_command_module_gives_commands_and_the_cli_only_registers_them():
    from mindformers_sigma import cli
    from mindformers_sigma.one_line_parser import Command

    import importlib

    names = []
    for module in cli.COMMAND_MODULES:
        commands = importlib.import_module(f"mindformers_sigma.{module}").COMMANDS
        assert commands and all(isinstance(command, Command) for command in commands), module
        names += [command.name for command in commands]
    assert len(names) == len(set(names))
    defined = [node.name for node in ast.parse((PACKAGE / "cli.py").read_text()).body
               if isinstance(node, ast.FunctionDef)]
    assert defined == ["build_parser", "main"]


def test_bench_holds_results_only():
    """Benchmarks live in `pangu-sigma bench`; bench/ keeps the latest run's records, no scripts, no old pairs."""
    files = [path.relative_to(REPO / "bench").as_posix() for path in (REPO / "bench").rglob("*")
             if path.is_file() and "logs" not in path.parts]  # a run's logs/ folder is git-ignored
    assert "results/suite/bench.json" in files
    assert [name for name in files if not name.endswith((".json", ".md", ".png"))] == []
    assert [name for name in files if re.search(r"_old|_new|before", name)] == []
