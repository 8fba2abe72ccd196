"""The book: its table of contents covers every chapter, every chapter is a python3 MyST notebook that
opens with the library's set-up call, and the book builds with every chapter executed (slow); the built
pages, opened in headless Chromium with the network off, show rendered formulas, numbered captioned figures
and real tables."""
import html.parser
import os
import re
import shutil
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


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


class _Text(html.parser.HTMLParser):
    """The text a reader sees: everything outside <script>, <style> and <noscript>."""

    def __init__(self):
        super().__init__()
        self.skip, self.parts = 0, []

    def handle_starttag(self, tag, attrs):
        self.skip += tag in ("script", "style", "noscript")

    def handle_endtag(self, tag):
        self.skip -= tag in ("script", "style", "noscript") and self.skip > 0

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)


def rendered_dom(page: Path) -> str:
    """The page's DOM after its scripts ran, from headless Chromium with no network at all: a network
    namespace of its own when root can make one (as in CI), and in any case every host name unresolvable
    and every request sent to a dead proxy."""
    chromium = _chromium()
    assert chromium, "no chromium: install Debian's chromium package (.ci/run does)"
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=http://127.0.0.1:9",
           "--virtual-time-budget=15000", "--dump-dom", page.as_uri()]
    if os.geteuid() == 0 and shutil.which("unshare"):
        cmd = ["unshare", "--net", *cmd]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0 and "<html" in r.stdout, r.stderr[-2000:]
    return r.stdout


def check_page_offline(page: Path, *, figures: int = 0, tables: int = 0) -> dict:
    """Assert what a reader of ``page`` sees offline; returns the counts found."""
    dom = rendered_dom(page)
    parser = _Text()
    parser.feed(dom)
    text = "".join(parser.parts)
    raw = re.findall(r".{0,40}(?:\\\(|\\\[|\$\$).{0,40}", text)
    assert not raw, f"{page.name}: raw LaTeX in the rendered text: {raw[:3]}"
    found = {"math": dom.count("<mjx-container"),
             "figures": len(re.findall(r'class="caption-number">Fig\. \d', dom)),
             "tables": len(re.findall(r"<table[^>]*>.*?<th", dom, flags=re.S))}
    assert found["math"] > 0, f"{page.name}: MathJax rendered no formula"
    assert found["figures"] >= figures, f"{page.name}: {found['figures']} numbered captioned figures"
    assert found["tables"] >= tables, f"{page.name}: {found['tables']} tables with a header row"
    assert "<matplotlib." not in text and " object at 0x" not in text, f"{page.name}: repr junk"
    return found


@pytest.mark.slow
def test_book_builds_with_all_chapters_executed(tmp_path):
    # Measured on the project's 2-core CPU: the whole build takes about 2-3 minutes; the slowest chapter
    # (recipe: four short toy trainings) executes in about 55-65 s.
    jb = Path(sys.executable).with_name("jupyter-book")
    r = subprocess.run([str(jb), "build", str(ROOT), "--path-output", str(tmp_path), "-W", "--keep-going"],
                       capture_output=True, text=True, timeout=1500, cwd=ROOT)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-5000:]
    assert "build succeeded" in log
    html_dir = tmp_path / "_build" / "html"
    for f in _toc_files():
        page = html_dir / f"{f}.html"
        assert page.exists(), page
        text = page.read_text()
        assert "Traceback" not in text, page
        # every executed chapter shows its outputs (a chapter that silently ran nothing would not)
        if f != "book/intro":
            assert "cell_output" in text, page
        # nothing is fetched from the network when the page is read (MathJax is served from _static)
        remote = re.findall(r'<(?:script|link)[^>]+(?:src|href)="(https?://[^"]+)"', text)
        assert not remote, f"{page.name} loads {remote}"
    for m in re.finditer(r"(\S+\.md): Executed notebook in ([\d.]+) seconds", log):
        assert float(m.group(2)) < 150, f"{m.group(1)} took {m.group(2)} s (budget: 90 s on the project CPU)"

    # Opened offline in a browser: formulas rendered, figures numbered and captioned, real tables.
    check_page_offline(html_dir / "book" / "recipe.html", figures=5, tables=1)
    check_page_offline(html_dir / "book" / "results.html", figures=2, tables=2)
    paper = html_dir / "book" / "what_is_known.html"
    check_page_offline(paper, tables=3)
    # the claims table holds a measured number for every claim a chapter checks. Sphinx reads (and myst-nb
    # executes) pages in sorted docname order and book/what_is_known sorts after every chapter, so the
    # chapters' claim records exist when the page runs; a page renamed past it would fail here.
    claims = paper.read_text()
    assert "not measured in this build" not in claims, "a chapter's claim record is missing"
    assert claims.count("agrees") >= 6
