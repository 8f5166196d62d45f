"""The shape of the code, checked: no import cycles (function-local imports included), no import by
name string, every task and stage registered and consistent. `lint-imports` (the README's test command)
checks the layers themselves."""

import ast
from pathlib import Path

import grimp

import slimtune
from slimtune.stages import STAGES
from slimtune.tasks import TASKS

SRC = Path(slimtune.__file__).parent


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(root: str) -> None:
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        component.append(top)
                        if top == node:
                            break
                    if len(component) > 1:
                        out.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = counter[0]
                counter[0] += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph.get(child, ())))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return out


def test_no_import_cycles_not_even_through_function_local_imports():
    g = grimp.build_graph("slimtune")  # grimp sees imports inside functions too
    graph = {m: set(g.find_modules_directly_imported_by(m)) for m in g.modules}
    assert _cycles(graph) == []


def test_no_module_is_imported_by_a_name_string():
    """importlib.import_module("slimtune....") hides a dependency from every tool: none is left."""
    offenders = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module":
                offenders.append(str(path.relative_to(SRC)))
    assert offenders == []


def test_every_stage_and_task_is_registered_under_its_own_name():
    for name, cls in STAGES.items():
        assert cls.name == name and all(callable(getattr(cls, m, None)) for m in ("validate", "run", "rebuild"))
        for tag, config in getattr(cls, "methods", {}).items():
            assert tag in config.model_fields["method"].annotation.__args__
    for name, cls in TASKS.items():
        assert cls.name == name
        assert cls.primary.name in cls.loop_metrics and cls.primary.name in cls.final_keys


def test_stages_and_runner_never_test_a_tasks_or_a_stages_name():
    """`if task == ...` / `if stage == "..."` branches are what the protocols replace."""
    names = set(TASKS) | set(STAGES)
    offenders = []
    for path in [SRC / "runner.py", *(SRC / "stages").glob("*.py"), SRC / "predict.py", SRC / "export.py"]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare):
                consts = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                if any(c in names for c in consts):
                    offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []
