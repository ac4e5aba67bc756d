"""The import arrows of scaling/ point one way, and no import hides inside a function."""

import ast
from pathlib import Path

SCALING = Path(__file__).parents[1] / "scaling"
# Lowest first: a module may import its own layer and the ones before it.
LAYERS = [
    {"scaling.errors", "scaling.faults"},
    {"scaling.store"},
    {"scaling.fitting"},
    {"scaling.studies"},
    {"scaling.checks"},
    {"scaling.figures"},
    {"scaling.notebook"},
]


def _layer(module: str) -> int:
    for i, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return i
    raise AssertionError(f"{module} is in no layer; add it to LAYERS")


def _modules():
    for path in sorted(SCALING.rglob("*.py")):
        parts = path.relative_to(SCALING.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, ast.parse(path.read_text())


def _imported(node) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.module:
        if node.module == "scaling":  # from scaling import x: x is the module
            return [f"scaling.{a.name}" for a in node.names]
        return [node.module]
    return []


def test_imports_point_down_the_layers_and_never_out_to_launch_or_models():
    wrong = []
    for name, tree in _modules():
        if name == "scaling":
            continue
        for node in ast.walk(tree):
            for target in _imported(node):
                if target.split(".")[0] in ("launch", "models"):
                    wrong.append(f"{name} imports {target}")
                elif target.startswith("scaling.") and _layer(target) > _layer(name):
                    wrong.append(f"{name} imports {target}, a layer above it")
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_inside_a_function():
    inside = []
    for name, tree in _modules():
        for function in ast.walk(tree):
            if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                inside += [
                    f"{name}.{function.name} imports {target}"
                    for node in ast.walk(function)
                    for target in _imported(node)
                ]
    assert not inside, "\n".join(inside)
