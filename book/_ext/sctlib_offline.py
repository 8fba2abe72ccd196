"""Sphinx extension for this book: formulas render with no network, and long code and wide tables fit.

MathJax 3 is served from the build itself (``_static/mathjax/``), copied from the ``django-static-mathjax``
package (MathJax's own files; Django is not needed), instead of Sphinx's default CDN address. Only what
the TeX-to-HTML renderer loads is copied: ``tex-chtml.js``, its HTML output fonts, the TeX extensions and
the UI/accessibility modules it loads on demand.
"""
import shutil
from pathlib import Path

_KEEP = ("tex-chtml.js", "output/chtml", "input/tex", "ui", "a11y", "adaptors")


def _mathjax_source() -> Path:
    try:
        import mathjax  # django-static-mathjax
    except ImportError as exc:  # pragma: no cover - the book extra installs it
        raise RuntimeError("the book needs MathJax served locally: pip install 'django-static-mathjax>=3.2' "
                           "(part of sctlib's [book] extra)") from exc
    src = Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"
    if not (src / "tex-chtml.js").is_file():
        raise RuntimeError(f"{src} has no tex-chtml.js: reinstall django-static-mathjax")
    return src


# The theme's text column is narrow for code: widen it, wrap long code lines instead of hiding them behind a
# scroll bar, and let wide tables scroll inside their own box.
_CSS = """
.bd-page-width { max-width: 96rem; }
.bd-main .bd-content .bd-article-container { max-width: 62rem; }
div.cell_input pre, div.highlight pre { white-space: pre-wrap; overflow-wrap: anywhere; font-size: 0.82rem; }
div.cell_output pre { white-space: pre-wrap; overflow-wrap: anywhere; font-size: 0.82rem; }
table.sctlib-table, .bd-article table.table { font-size: 0.85rem; }
div.cell_output table.sctlib-table { display: block; overflow-x: auto; max-width: 100%; }
table.sctlib-table caption { caption-side: top; font-style: italic; text-align: left; }
.bd-article table td code, .bd-article table td .pre { overflow-wrap: anywhere; white-space: normal; }
figure figcaption, div.figure p.caption { font-size: 0.9rem; }
"""


def _use_local_mathjax(app, config):
    src = _mathjax_source()
    static = Path(app.outdir).parent / "_offline_static"
    dst = static / "mathjax" / "es5"
    if not (dst / "tex-chtml.js").is_file():
        for part in _KEEP:
            s, d = src / part, dst / part
            d.parent.mkdir(parents=True, exist_ok=True)
            if s.is_dir():
                shutil.copytree(s, d, dirs_exist_ok=True)
            elif s.is_file():
                shutil.copy2(s, d)
    (static / "sctlib.css").write_text(_CSS)
    config.html_static_path = [*config.html_static_path, str(static)]
    # A path without a scheme is read relative to _static/ (Sphinx's add_js_file).
    config.mathjax_path = "mathjax/es5/tex-chtml.js"


def setup(app):
    app.connect("config-inited", _use_local_mathjax)
    app.add_css_file("sctlib.css")
    return {"parallel_read_safe": True, "parallel_write_safe": True}
