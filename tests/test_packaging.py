"""Repository hygiene: environment.yml agrees with pyproject.toml, notebooks are committed clean,
chapters and pipelines use only sctlib's public API, the README opens with its two commands."""
import ast
import json
import re
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_environment_yml_installs_the_pyproject_package_with_all_extras():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = env["dependencies"]
    py = [d for d in deps if isinstance(d, str) and d.startswith("python")]
    assert py, "environment.yml must pin a python"
    # Same minimum Python as pyproject's requires-python.
    assert py[0].split(">=")[1] == project["requires-python"].lstrip(">=")
    pip_lines = [d for d in deps if isinstance(d, dict) and "pip" in d][0]["pip"]
    assert pip_lines == ["-e .[all]"], "pyproject.toml is the single source of truth: install it, list nothing else"
    extras = project["optional-dependencies"]
    assert "all" in extras
    named = {e.split("[")[1].rstrip("]") for e in extras["all"]}
    assert {"metrics", "book", "dev"} <= {x.strip() for n in named for x in n.split(",")}


def _notebooks():
    return sorted(p for p in ROOT.glob("pipelines/*.ipynb")) + sorted(ROOT.glob("book/**/*.ipynb"))


@pytest.mark.parametrize("path", _notebooks(), ids=lambda p: p.name)
def test_notebooks_are_committed_clean_with_a_kernelspec(path):
    nb = json.loads(path.read_text())
    assert nb["metadata"].get("kernelspec", {}).get("name") == "python3", "papermill needs a kernelspec"
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert not cell.get("outputs") and not cell.get("execution_count"), f"{path.name} has outputs"


@pytest.mark.parametrize("path", sorted(ROOT.glob("pipelines/*.ipynb")), ids=lambda p: p.name)
def test_pipelines_have_a_parameters_cell_and_a_synced_py_twin(path):
    nb = json.loads(path.read_text())
    tags = [t for c in nb["cells"] for t in c.get("metadata", {}).get("tags", [])]
    assert "parameters" in tags, "papermill -p needs a cell tagged 'parameters'"
    twin = path.with_suffix(".py")
    assert twin.exists(), f"{twin.name}: the jupytext py:percent twin is missing"
    import jupytext

    from_py = jupytext.reads(twin.read_text(), fmt="py:percent")
    code_nb = [c["source"] if isinstance(c["source"], str) else "".join(c["source"])
               for c in nb["cells"] if c["cell_type"] == "code"]
    code_py = [c.source for c in from_py.cells if c.cell_type == "code"]
    assert [s.strip() for s in code_nb] == [s.strip() for s in code_py], "run `jupytext --sync` on the pair"


def _code_of(path: Path) -> str:
    if path.suffix == ".ipynb":
        nb = json.loads(path.read_text())
        return "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    if path.suffix == ".md":
        blocks = re.findall(r"```\{code-cell\}[^\n]*\n(.*?)```", path.read_text(), flags=re.S)
        # a cell's options block (---\n<yaml>\n---) is not code
        blocks = [re.sub(r"\A---\n.*?\n---\n", "", b, flags=re.S) for b in blocks]
        return "\n".join("\n".join(l for l in b.splitlines() if not l.startswith(":")) for b in blocks)
    return path.read_text()


def _narrative_files():
    return sorted([*ROOT.glob("book/**/*.md"), *ROOT.glob("book/**/*.ipynb"), *ROOT.glob("pipelines/*.ipynb")])


@pytest.mark.parametrize("path", _narrative_files(), ids=lambda p: p.name)
def test_chapters_and_pipelines_use_only_the_public_api(path):
    tree = ast.parse(_code_of(path) or "pass")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sctlib"):
            assert not any(part.startswith("_") for part in node.module.split(".")), node.module
            assert not any(a.name.startswith("_") for a in node.names), f"private import in {path.name}"
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("sctlib"):
                    assert not any(p.startswith("_") for p in a.name.split(".")), a.name
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in ("sctlib", "sct"):
                raise AssertionError(f"{path.name} reaches the private name {node.attr}")


def test_readme_opens_with_two_commands():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 2
    assert "make quickstart" in blocks[0] and "make test" in blocks[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci, ".ci/run must call the README's test command"
