"""The repository keeps one style: ruff's checks as configured in ruff.toml, and modules in layers
(each imports only the ones above it in the README's file table, so no two import each other)."""
import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted(path.stem for path in ROOT.glob("*.py"))


def test_ruff_finds_nothing_to_fix():
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", "."],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def imported_names(node):
    if isinstance(node, ast.Import):
        return [alias.name.split(".")[0] for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0:
        return [node.module.split(".")[0]]
    return []


def imports_inside_functions(module):
    """The project's modules that `module` imports below its top level: [(name, line)]."""
    tree = ast.parse((ROOT / f"{module}.py").read_text(encoding="utf-8"))
    at_top = {id(node) for node in tree.body}
    return [(name, node.lineno) for node in ast.walk(tree) if id(node) not in at_top
            for name in imported_names(node) if name in MODULES]


def project_imports(module):
    """The project's modules that `module` imports, anywhere in it: {name: first line}."""
    found = {}
    for node in ast.walk(ast.parse((ROOT / f"{module}.py").read_text(encoding="utf-8"))):
        for name in imported_names(node):
            if name in MODULES:
                found.setdefault(name, node.lineno)
    return found


def readme_layers():
    """The modules in the order of the README's file table."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"^\| `(\w+)\.py`", readme, flags=re.M)


def test_every_module_is_in_the_readme_table():
    assert sorted(readme_layers()) == MODULES


def test_the_projects_modules_are_imported_at_the_top_of_each_module():
    # verify.py imports inside its checks on purpose: it reports a broken installation in a row.
    inside = [f"{module}.py line {line}: import {name}" for module in MODULES if module != "verify"
              for name, line in imports_inside_functions(module)]
    assert not inside, "\n".join(inside)


def upward_imports(layers):
    return [f"{module}.py line {line} imports {name}, which sits below it in the README's table"
            for module in layers for name, line in project_imports(module).items()
            if layers.index(name) >= layers.index(module)]


def test_each_module_imports_only_modules_above_it_so_there_is_no_cycle():
    upward = upward_imports(readme_layers())
    assert not upward, "\n".join(upward)


def test_the_layering_check_sees_an_import_of_a_module_below(tmp_path, monkeypatch):
    (tmp_path / "low.py").write_text("def f():\n    import high\n")    # inside a function too
    (tmp_path / "high.py").write_text("import low\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "MODULES", ["high", "low"])
    assert upward_imports(["low", "high"]) == ["low.py line 2 imports high, which sits below it in "
                                               "the README's table"]
    assert imports_inside_functions("low") == [("high", 2)] and imports_inside_functions("high") == []
