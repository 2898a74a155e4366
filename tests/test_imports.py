"""Imports flow one way: every module of cascade/, teachers/ and export/ imports only from its own
layer or the layers below it (docs/architecture.md draws the same order), and evaluation,
its report and export import no task module."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Bottom first. A name ending in ".*" is every module of that package.
LAYERS = [
    ["cascade.features", "cascade.metrics", "cascade.yamlfile", "cascade.distributed", "cascade.verdict"],  # no torch at import
    ["cascade.data.*"],  # numpy and pyarrow; never torch
    ["cascade.saved"],
    ["cascade.train"],
    # the task registry's package file imports nothing of the package, so the config check reads it
    ["cascade.tasks", "cascade.config", "cascade.towers.*", "cascade.losses.*", "cascade.blend", "teachers.*"],
    ["cascade.models"],
    ["cascade.recall"],
    ["cascade.cascade", "cascade.prepare"],
    ["cascade.tasks.*", "cascade.eval_data", "cascade.evaluate", "cascade.report"],
    ["export.*"],
    ["cascade.job", "cascade.cli"],
]
# A LightGBM teacher trains through the tasks' data path: its two training functions import them
# inside the function (teachers.BOOSTED calls them; nothing below the tasks does).
UPWARD_INSIDE_FUNCTIONS = {("teachers.gbdt", "cascade.tasks.pointwise"), ("teachers.gbdt", "cascade.tasks.recall"), ("teachers.gbdt", "cascade.tasks.distill")}
NO_TASK_MODULE = ("cascade.evaluate", "cascade.report", "cascade.verdict", "cascade.eval_data", "export.")


def _modules() -> dict[str, Path]:
    out = {}
    for package in ("cascade", "teachers", "export"):
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _layer(module: str) -> int:
    """The layer of ``module``: its own name's, else its package's (``pkg.*`` covers ``pkg`` and
    its modules; ``cascade.tasks``, the registry, is named on its own); -1 when it has none."""
    exact = [i for i, names in enumerate(LAYERS) if module in names]
    star = [i for i, names in enumerate(LAYERS) for name in names if name.endswith(".*") and (module + ".").startswith(name[:-1])]
    return (exact or star or [-1])[0]


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(module imported, whether inside a function) for each import of the package's own modules."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node: ast.AST, inside: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = inside or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.If) and getattr(child.test, "id", "") == "TYPE_CHECKING":
                continue  # annotations only
            if isinstance(child, ast.Import):
                found.extend((a.name, inside) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                # "from cascade import metrics" imports the module cascade.metrics
                for a in child.names:
                    sub = f"{child.module}.{a.name}"
                    found.append((sub if sub in MODULES else child.module, inside))
            visit(child, nested)

    visit(tree, False)
    return [(m, inside) for m, inside in found if m.split(".")[0] in ("cascade", "teachers", "export") and m != "cascade"]


MODULES = _modules()


def test_every_module_has_a_layer():
    assert [m for m in MODULES if _layer(m) < 0 and m != "cascade"] == []


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "cascade"))
def test_no_module_imports_one_above_it(module):
    upward = [(target, inside) for target, inside in _imports(MODULES[module]) if _layer(target) > _layer(module) and not (inside and (module, target) in UPWARD_INSIDE_FUNCTIONS)]
    assert upward == [], f"{module} (layer {_layer(module)}) imports " + ", ".join(f"{t} (layer {_layer(t)}{', inside a function' if i else ''})" for t, i in upward)


def test_evaluation_its_report_and_export_import_no_task_module():
    offenders = {m: [t for t, _ in _imports(MODULES[m]) if t.startswith("cascade.tasks.")] for m in MODULES if m.startswith(NO_TASK_MODULE)}
    assert {m: t for m, t in offenders.items() if t} == {}


def test_the_checker_reads_imports_at_both_levels():
    # the tests above would pass vacuously if _imports found nothing
    assert ("cascade.tasks", False) in _imports(MODULES["cascade.config"])  # module level
    assert ("cascade.tasks", True) in _imports(MODULES["cascade.cli"])  # inside a function
    assert ("cascade.metrics", False) in _imports(MODULES["cascade.evaluate"])  # "from cascade import metrics"
    assert _layer("cascade.tasks") == _layer("cascade.config") < _layer("cascade.models") < _layer("cascade.tasks.pointwise")
