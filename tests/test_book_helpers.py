"""The book's record helpers: the committed record is the book's number (a reader's run never replaces it),
every record in book/results/ is rendered without new code, tables are real tables, and the claims table
shows what the chapters recorded."""
import json

import pytest

import sctlib as sct


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "_config.yml").write_text("title: t\n")
    (tmp_path / "sctlib").mkdir()
    (tmp_path / "book" / "results").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _write(path, results, **extra):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"results": results, **extra}))


def test_load_results_reads_the_committed_record_unless_asked_for_the_readers_run(project):
    _write(project / "book" / "results" / "quickstart.json", {"SCT": {"fd_1step": 15.0}})
    _write(project / "runs" / "quickstart" / "results.json", {"SCT": {"fd_1step": 999.0}})
    assert sct.book.load_results("quickstart")["results"]["SCT"]["fd_1step"] == 15.0
    assert sct.book.load_results("quickstart", own=True)["results"]["SCT"]["fd_1step"] == 999.0
    (project / "book" / "results" / "quickstart.json").unlink()
    with pytest.raises(FileNotFoundError, match="book/results/quickstart.json"):
        sct.book.load_results("quickstart")  # never falls back to the reader's run


def test_render_records_shows_every_committed_record_and_labels_the_readers_run(project, capsys):
    from IPython.core import display_functions

    shown = []
    orig = display_functions.display
    display_functions.display = lambda *objs, **kw: shown.extend(objs)
    try:
        import IPython.display as ipd

        ipd_display = ipd.display
        ipd.display = display_functions.display
        _write(project / "book" / "results" / "ablation-ect.json", {"fid_1step": {"mean": 3.9, "sd": 0.01, "min": 3.88}},
               paper=sct.paper.comparison(sct.config.get_preset("cifar10-ect")))
        _write(project / "book" / "results" / "precision.json", {"bf16": {"img_per_s": 1194.0}})
        _write(project / "runs" / "precision" / "results.json", {"bf16": {"img_per_s": 7.0}})
        names = sct.book.render_records()
    finally:
        display_functions.display = orig
        ipd.display = ipd_display
    assert names == ["ablation-ect", "precision"]
    html = "".join(o._repr_html_() if hasattr(o, "_repr_html_") else str(getattr(o, "data", o)) for o in shown)
    assert html.count("<table") == 4  # two results, one paper comparison, the reader's run
    assert "3.86" in html and "Your own run" in html and "not the book's number" in html
    assert html.index("1,194") < html.index("Your own run") < html.rindex(">7<")


def test_table_renders_html_with_formatted_numbers_and_columns_in_given_order():
    t = sct.book.record_table({"teacher": {"fd_18step": 4.98597}, "ECT": {"fd_1step": 40.00727, "acc_1step": 0.999}})
    html = t._repr_html_()
    assert "<th>fd_18step</th><th>fd_1step</th><th>acc_1step</th>" in html  # first-seen order, not sorted
    assert ">4.986<" in html and ">40.01<" in html and "–" in html
    assert "4.98597" not in repr(t)


def test_claims_table_shows_recorded_measurements(project):
    sct.book.record_claim(4, "residual 2e-5 at N = 32", "agrees")
    with pytest.raises(ValueError, match="status"):
        sct.book.record_claim(4, "x", "maybe")
    with pytest.raises(KeyError):
        sct.book.record_claim(99, "x", "agrees")
    rows = {r[0]: r for r in sct.book.claims_table().rows}
    assert rows[4][3] == "residual 2e-5 at N = 32" and rows[4][5] == "agrees"
    assert rows[1][5] == "not tested" and "not measured" in rows[1][3]
    assert rows[12][4].startswith("2.42 / 1.55")
