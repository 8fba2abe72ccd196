"""Sphinx extension for this book: formulas render with no network.

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
    config.html_static_path = [*config.html_static_path, str(static)]
    # A path without a scheme is read relative to _static/ (Sphinx's add_js_file).
    config.mathjax_path = "mathjax/es5/tex-chtml.js"


def setup(app):
    app.connect("config-inited", _use_local_mathjax)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
