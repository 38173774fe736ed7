"""The layer contract: comm <- parallel <- moe <- models <- runtime <- serve <- cli.

A module may import its own layer and the layers below it (plus the base
modules shoal.errors and shoal.config), never a layer above, not even inside a
function.
"""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2] / "shoal"
ORDER = ["errors", "config", "comm", "parallel", "moe", "models", "runtime", "serve", "cli"]
BASE = {"errors", "config"}


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


def test_no_module_imports_upward():
    violations = []
    for path in ROOT.rglob("*.py"):
        if path == ROOT / "__init__.py" or path.name == "__main__.py":
            continue
        own = module_layer(path)
        if own not in ORDER:
            violations.append(f"{path}: not in a known layer {ORDER}")
            continue
        for lineno, module in imported_modules(ast.parse(path.read_text())):
            target = layer_of(module)
            if target is None or target in BASE:
                continue
            if target not in ORDER:
                violations.append(f"{path}:{lineno} imports unknown layer {module}")
            elif own in BASE or ORDER.index(target) > ORDER.index(own):
                violations.append(f"{path}:{lineno} ({own}) imports upward: {module}")
    assert not violations, "\n".join(violations)


def test_the_checker_catches_an_upward_import(tmp_path):
    tree = ast.parse("def f():\n    from shoal.runtime.engine import LLMEngine\n")
    modules = [m for _, m in imported_modules(tree)]
    assert layer_of(modules[0]) == "runtime"
    assert ORDER.index("runtime") > ORDER.index("models")
