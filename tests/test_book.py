"""The book: its table of contents covers every chapter, every chapter is a python3 MyST notebook that
opens with the library's set-up call, and the book builds with every chapter executed (slow)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "book").glob("*.md"))


def _toc_files():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    return [toc["root"]] + [c["file"] for c in toc.get("chapters", [])]


def test_toc_lists_every_chapter_and_only_existing_ones():
    files = _toc_files()
    assert len(files) == len(set(files)), "a chapter is listed twice"
    chapters = sorted(str(p.relative_to(ROOT).with_suffix("")) for p in CHAPTERS)
    assert sorted(files) == chapters


def test_config_executes_and_excludes_the_non_book_folders():
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert config["execute"]["execute_notebooks"] in ("force", "cache")
    assert config["only_build_toc_files"] is True
    for folder in [".venv", "runs", "_build", "pipelines", "tests", "benchmarks", "shared", "README.md"]:
        assert folder in config["exclude_patterns"], folder
    assert {"dollarmath", "amsmath"} <= set(config["parse"]["myst_enable_extensions"])


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_chapter_is_a_python3_notebook_that_opens_with_setup(path):
    text = path.read_text()
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["kernelspec"]["name"] == "python3"
    assert front["jupytext"]["text_representation"]["format_name"] == "myst"
    first = re.search(r"```\{code-cell\} ipython3\n(.*?)```", text, flags=re.S)
    assert first, f"{path.name} has no code cell"
    assert "import sctlib as sct" in first.group(1) and "sct.book.setup(seed=0" in first.group(1)
    assert "\t" not in text, f"{path.name} holds a tab (a '\\t' escape eaten from LaTeX?)"


@pytest.mark.slow
def test_book_builds_with_all_chapters_executed(tmp_path):
    # Measured on the project's 2-core CPU: the whole build takes about 2-2.5 minutes; the slowest chapter
    # (recipe: four short toy trainings) executes in about 55-65 s.
    jb = Path(sys.executable).with_name("jupyter-book")
    r = subprocess.run([str(jb), "build", str(ROOT), "--path-output", str(tmp_path), "-W", "--keep-going"],
                       capture_output=True, text=True, timeout=1500, cwd=ROOT)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-5000:]
    assert "build succeeded" in log
    html = tmp_path / "_build" / "html"
    for f in _toc_files():
        page = html / f"{f}.html"
        assert page.exists(), page
        text = page.read_text()
        assert "Traceback" not in text, page
        # every executed chapter shows its outputs (a chapter that silently ran nothing would not)
        if f != "book/intro":
            assert "cell_output" in text, page
    for m in re.finditer(r"(\S+\.md): Executed notebook in ([\d.]+) seconds", log):
        assert float(m.group(2)) < 150, f"{m.group(1)} took {m.group(2)} s (budget: 90 s on the project CPU)"
