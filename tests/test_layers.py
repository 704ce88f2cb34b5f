"""The import graph keeps ARCHITECTURE.md's layers: a lower row never imports a higher one.

Function-level imports count too: a layer is broken by what a module can reach, wherever the import
statement sits."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "chatforge"

# ARCHITECTURE.md, "Who may import whom" (lower numbers are lower rows)
LAYERS = {
    "runtime": 1, "paths": 1, "progress": 1, "errors": 1, "flags": 1,
    "tokenizer": 2, "conversation": 2,
    "data": 3, "model": 3,
    "tasks": 4, "infer": 4,
    "train": 5, "eval": 5,
    "serve": 6, "chat_cli": 6, "report": 6, "speedrun": 6, "bench": 6, "cli": 6, "export": 6,
    "export_tokenizer": 6, "hf_modeling": 6,
    "env_report": 6, "tokenizer_stage": 6, "__main__": 6,
    "__init__": 1,  # the package's docstring and version
}


def layer_of(module: str) -> tuple[str, int]:
    top = module.split(".")[1] if module.count(".") else "__init__"
    return top, LAYERS[top]


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("chatforge")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("chatforge"):
            if node.module == "chatforge":  # `from chatforge import paths` names a module; `__version__` does not
                found |= {f"chatforge.{a.name}" if (PACKAGE / a.name).exists() or (PACKAGE / f"{a.name}.py").exists()
                          else "chatforge" for a in node.names}
            else:
                found.add(node.module)
    return found


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        yield ".".join(rel.parts), path


def test_every_top_level_module_has_a_layer():
    tops = {layer_of(name)[0] for name, _ in modules()}
    assert tops <= set(LAYERS), tops - set(LAYERS)


@pytest.mark.parametrize("name, path", list(modules()), ids=[n for n, _ in modules()])
def test_no_module_imports_a_higher_layer(name, path):
    own_top, own = layer_of(name)
    bad = []
    for target in imports_of(path):
        top, level = layer_of(target)
        if level > own and top != own_top:
            bad.append(f"{target} (row {level})")
    assert not bad, f"{name} (row {own}) imports " + ", ".join(sorted(bad))


def test_evaluation_never_imports_training():
    for name, path in modules():
        if name.startswith("chatforge.eval"):
            assert not [t for t in imports_of(path) if t.startswith("chatforge.train")], name
