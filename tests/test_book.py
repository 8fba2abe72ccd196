"""The book: its table of contents covers every chapter, and it builds with every chapter executed."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _toc_files():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]] + [c["file"] for c in toc.get("chapters", [])]
    return files


def test_toc_lists_every_chapter_and_only_existing_ones():
    files = _toc_files()
    chapters = sorted(str(p.relative_to(ROOT).with_suffix("")) for p in (ROOT / "book").glob("*.md"))
    assert sorted(files) == chapters
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert config["execute"]["execute_notebooks"] in ("force", "cache", "auto")


@pytest.mark.slow
def test_book_builds_with_all_chapters_executed(tmp_path):
    jb = Path(sys.executable).with_name("jupyter-book")
    r = subprocess.run([str(jb), "build", str(ROOT), "--path-output", str(tmp_path), "-W", "--keep-going"],
                       capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    html = tmp_path / "_build" / "html"
    for f in _toc_files():
        page = html / f"{f}.html"
        assert page.exists(), page
        text = page.read_text()
        assert "Traceback" not in text, page
