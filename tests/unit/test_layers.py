"""The layer contract, by process and boundary.

    comm <- parallel <- moe <- models <- checkpoint <- engine <- {executor, worker}
         <- frontend <- serve <- {bench, gateway} <- cli

A module may import its own layer and the layers its layer is allowed (below),
plus the base modules shoal.errors and shoal.config, never anything else, not
even inside a function. Beyond the order:

- ``engine`` (the driver) is torch-free and imports neither ``models`` nor ``worker``;
- ``executor`` (driver side of the workers) never imports ``worker`` or ``models``;
- ``worker`` imports from the driver side only the plan and control types
  (``shoal.engine.plan``, ``shoal.engine.control``);
- ``engine_args`` (the vLLM-name table) sits on the configs, for the frontends.
"""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2] / "shoal"
BASE = {"errors", "config"}
BELOW_ENGINE = {"comm", "parallel", "moe", "models", "checkpoint"}
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "config": {"errors"},
    "engine_args": set(),
    "comm": set(),
    "parallel": {"comm"},
    "moe": {"comm", "parallel"},
    "models": {"comm", "parallel", "moe"},
    "checkpoint": {"comm", "parallel", "moe", "models"},
    "engine": {"comm"},
    "executor": {"comm", "parallel", "engine"},
    "worker": BELOW_ENGINE | {"engine"},
    "frontend": BELOW_ENGINE | {"engine", "executor", "worker", "engine_args"},
    "serve": BELOW_ENGINE | {"engine", "executor", "worker", "engine_args", "frontend"},
    "gateway": {"serve"},  # the front process: shoal.serve's HTTP helpers, no engine internals
    "bench": BELOW_ENGINE | {"engine", "executor", "worker", "engine_args", "frontend", "serve"},
    "cli": BELOW_ENGINE | {"engine", "executor", "worker", "engine_args", "frontend", "serve",
                          "bench", "gateway"},
}
# what the worker process may take from the driver side
WORKER_FROM_ENGINE = {"shoal.engine.plan", "shoal.engine.control"}
TORCH_FREE = {"engine", "executor", "engine_args", "config", "errors"}
HEAVY = {"torch", "transformers"}


def layer_of(dotted: str) -> str | None:
    parts = dotted.split(".")
    if parts[0] != "shoal" or len(parts) < 2:
        return None
    return parts[1]


def module_layer(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0].removesuffix(".py")


def imported_modules(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module


def violations_of(own: str, source: str, where: str) -> list[str]:
    """Every import in ``source`` (a module of layer ``own``) that breaks the contract."""
    found = []
    for lineno, module in imported_modules(ast.parse(source)):
        if own in TORCH_FREE and module.split(".")[0] in HEAVY:
            found.append(f"{where}:{lineno} ({own}) must stay torch-free: imports {module}")
        target = layer_of(module)
        if target is None or target == own:
            continue
        if target in BASE and own not in ("errors", "config"):
            continue
        if target not in ALLOWED:
            found.append(f"{where}:{lineno} imports unknown layer {module}")
        elif target not in ALLOWED[own]:
            found.append(f"{where}:{lineno} ({own}) may not import {module}")
        elif own == "worker" and target == "engine" and module not in WORKER_FROM_ENGINE:
            found.append(f"{where}:{lineno} (worker) may take only the plan and control types "
                         f"from the driver side, not {module}")
    return found


def test_no_module_breaks_the_layer_contract():
    violations = []
    for path in ROOT.rglob("*.py"):
        if path == ROOT / "__init__.py" or path.name == "__main__.py":
            continue
        own = module_layer(path)
        if own not in ALLOWED:
            violations.append(f"{path}: not in a known layer {sorted(ALLOWED)}")
            continue
        violations += violations_of(own, path.read_text(), str(path))
    assert not violations, "\n".join(violations)


def test_the_checker_catches_upward_and_cross_process_imports():
    upward = "def f():\n    from shoal.frontend.llm_engine import LLMEngine\n"
    assert violations_of("models", upward, "m.py")
    assert violations_of("engine", "from shoal.models.llama import LlamaModel\n", "e.py")
    assert violations_of("executor", "from shoal.worker.worker import Worker\n", "x.py")
    assert violations_of("engine", "import torch\n", "e.py")
    worker_from_scheduler = "from shoal.engine.scheduler import Scheduler\n"
    assert violations_of("worker", worker_from_scheduler, "w.py")
    assert not violations_of("worker", "from shoal.engine.plan import StepPlan\n", "w.py")
    assert not violations_of("frontend", "from shoal.engine.core import EngineCore\n", "f.py")


# A function-local import is allowed only for an optional extra (the module is
# not installed by `make setup`) or where deferring it is the point (a lazy
# package attribute, a version report that must not load torch into a client).
LOCAL_IMPORT_OK = {
    "ray", "matplotlib", "fcntl",  # optional extras / POSIX-only
    "shoal/__init__.py:shoal",  # PEP 562 lazy LLM/SamplingParams
    "shoal/bench/environment.py:*",  # versions of what is installed, loaded only to report
    "shoal/checkpoint/default_model.py:transformers",  # the [convert] extra's path
}


def local_imports(tree: ast.AST):
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    yield from ((node.lineno, a.name) for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    yield node.lineno, node.module


def local_import_violations(rel: str, source: str) -> list[str]:
    found = []
    for lineno, module in local_imports(ast.parse(source)):
        top = module.split(".")[0]
        if top in LOCAL_IMPORT_OK or f"{rel}:{top}" in LOCAL_IMPORT_OK or f"{rel}:*" in LOCAL_IMPORT_OK:
            continue
        found.append(f"{rel}:{lineno} imports {module} inside a function")
    return found


def test_no_function_local_import_dodges_a_dependency():
    violations = []
    for path in ROOT.rglob("*.py"):
        rel = str(path.relative_to(ROOT.parent))
        violations += local_import_violations(rel, path.read_text())
    assert not violations, "\n".join(violations)
    assert local_import_violations("shoal/serve/x.py", "def f():\n    import uvicorn\n")
