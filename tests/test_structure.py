"""The floor plan: the import graph of the project's modules has no cycle (imports inside functions
count), and every arrow points down (the pipeline never imports the trainer, inference never imports
a training loop, the foundations import no stage, only the executor imports Dask)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from tests.paths import ROOT



def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(project module -> project modules it imports, project module -> top-level third-party
    packages it imports), every import statement anywhere in the file except under TYPE_CHECKING."""
    files = [p for top in ("pipeline", "ws3d_train") for p in (ROOT / top).rglob("*.py")] + [ROOT / "cli.py"]
    modules = {_module_name(p): p for p in files}

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {m: set() for m in modules}
    external: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        tree = ast.parse(path.read_text())
        skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _type_checking(node)
                for b in node.body for n in ast.walk(b)}
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                hit = resolve(target)
                if hit is None:
                    if target and not target.startswith(("pipeline", "ws3d_train", "cli")):
                        external[module].add(target.split(".")[0])
                elif hit != module and not module.startswith(hit + "."):  # a package's own __init__: no arrow
                    edges[module].add(hit)
    return edges, external


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in list(edges):
        if v not in index:
            visit(v)
    return found


def family(module: str) -> str:
    """The family a module belongs to: its subpackage (`pipeline.render`, `ws3d_train.train`), or
    the module itself at a package's top level (`pipeline.store`, `ws3d_train.run`)."""
    parts = module.split(".")
    return ".".join(parts[:2])


EDGES, EXTERNAL = import_graph()

PIPELINE_CORE = ("pipeline.errors", "pipeline.config", "pipeline.schema", "pipeline.parallel", "pipeline.progress",
                 "pipeline.storage", "pipeline.store", "pipeline.executor", "pipeline.stage")
"""The pipeline's foundations: they know no dataset and no stage."""
STAGE_FAMILIES = ("pipeline.datasets", "pipeline.overseg", "pipeline.render", "pipeline.clip", "pipeline.teacher",
                  "pipeline.embed", "pipeline.stages", "pipeline.workflow", "pipeline.summary", "pipeline.validate")
TRAINER_FOUNDATIONS = ("ws3d_train.sparse", "ws3d_train.network", "ws3d_train.checkpoint", "ws3d_train.device",
                       "ws3d_train.logging", "ws3d_train.open_vocab", "ws3d_train.boundaries", "ws3d_train.data")
"""What training and inference both stand on: they import neither."""
INFERENCE = ("ws3d_train.infer", "ws3d_train.viewer", "ws3d_train.run")


def _arrows(source_prefixes: tuple[str, ...], target_prefixes: tuple[str, ...]) -> list[str]:
    def within(module: str, prefixes: tuple[str, ...]) -> bool:
        return any(module == p or module.startswith(p + ".") for p in prefixes)

    return sorted(f"{a} -> {b}" for a, targets in EDGES.items() for b in targets
                  if within(a, source_prefixes) and within(b, target_prefixes))


def test_the_graph_sees_the_project():
    assert len(EDGES) > 80 and "pipeline.stage" in EDGES and "ws3d_train.train.loop" in EDGES
    assert "pipeline.stage" in EDGES["pipeline.datasets.ingest"]  # arrows are read, imports in functions too
    assert "pipeline.render.core" in EDGES["pipeline.render.stage"]


def test_no_cycles_among_modules():
    assert cycles(EDGES) == []


def test_no_cycles_among_families():
    """Collapsed to subpackages (and top-level modules), the graph is still a DAG: a family's
    modules never import a family that imports back."""
    collapsed: dict[str, set[str]] = {}
    for a, targets in EDGES.items():
        collapsed.setdefault(family(a), set()).update(family(b) for b in targets if family(b) != family(a))
    assert cycles(collapsed) == []


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_arrows_point_down():
    assert _arrows(("pipeline",), ("ws3d_train", "cli")) == [], "the pipeline never imports the trainer"
    assert _arrows(("ws3d_train",), ("cli",)) == []
    assert _arrows(INFERENCE, ("ws3d_train.train", "ws3d_train.demo", "ws3d_train.bench")) == [], \
        "inference never imports a training loop"
    assert _arrows(TRAINER_FOUNDATIONS, ("ws3d_train.train", "ws3d_train.infer", "ws3d_train.viewer",
                                         "ws3d_train.bench", "ws3d_train.demo", "ws3d_train.run")) == []
    assert _arrows(PIPELINE_CORE, STAGE_FAMILIES) == [], "the store, executor and stage runner know no stage"
    assert _arrows(("pipeline.datasets",), ("pipeline.overseg", "pipeline.render", "pipeline.embed",
                                            "pipeline.teacher", "pipeline.workflow", "pipeline.stages")) == []


def test_only_the_executor_imports_dask():
    users = sorted(m for m, packages in EXTERNAL.items() if packages & {"dask", "distributed", "dask_jobqueue"})
    assert users == ["pipeline.executor"]


def test_inference_loads_no_training_loop_in_a_fresh_interpreter():
    code = ("import sys; import ws3d_train.infer.predict, ws3d_train.infer.evaluate, ws3d_train.infer.report; "
            "bad = sorted(m for m in sys.modules if m.startswith('ws3d_train.train')); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("stage", ["ingest", "overseg", "render", "embed"])
def test_stage_declarations_are_light(stage):
    """Listing the stages (what `ws3d --help` does) loads neither torch nor Open3D."""
    code = ("import sys; from pipeline.stages import BY_NAME; BY_NAME[%r]; "
            "heavy = [m for m in ('torch', 'open3d', 'transformers') if m in sys.modules]; assert not heavy, heavy") % stage
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)
