"""The paper's numbers: each preset is compared with the like-for-like published rows, and every row and
claim carries its source."""
import pytest

import sctlib as sct
from sctlib import paper


def _fids(preset, **kw):
    cfg = sct.config.get_preset(preset) if isinstance(preset, str) else preset
    return {(r.source.split(" (")[0] if "README" not in r.source else "ECT README", r.method, r.steps): r.fid
            for r in paper.matching_rows(cfg, **kw)}


def test_cifar10_ect_preset_is_compared_with_ect_at_its_own_length():
    # the preset trains 25.6 M images at batch 128 = 200k iterations: ECT's 200k row, not its 400k one
    assert _fids("cifar10-ect") == {("ECT README", "ECT", 1): 3.86, ("ECT README", "ECT", 2): 2.15,
                                    ("SCT Table 2", "ECT", 1): 3.78, ("SCT Table 2", "ECT", 2): 2.13}
    longer = sct.config.override(sct.config.get_preset("cifar10-ect"), total_nimg=400_000 * 128)
    assert _fids(longer)[("ECT README", "ECT", 1)] == 3.60


def test_cifar10_sct_preset_gets_unguided_sct_rows_and_guided_only_when_asked():
    assert _fids("cifar10-sct") == {("SCT Table 2", "SCT", 1): 3.11, ("SCT Table 2", "SCT", 2): 2.05}
    assert _fids("cifar10-sct", guided=True) == {("SCT Table 2", "SCT*", 1): 2.92, ("SCT Table 2", "SCT*", 2): 2.02}
    assert _fids("cifar10-sct", steps=(4, 8), phased=True) == {("SCT Table 2", "SCT phased", 4): 1.95,
                                                                ("SCT Table 2", "SCT phased", 8): 1.86}
    cond = sct.config.override(sct.config.get_preset("cifar10-sct"), cond=True, **{"net.label_dim": 10})
    assert _fids(cond) == {("SCT Table 2", "Cond-SCT", 1): 3.03, ("SCT Table 2", "Cond-SCT", 2): 1.88}


@pytest.mark.parametrize("preset,expected", [
    ("imagenet64-s-ect", {1: 5.51, 2: 3.18}), ("imagenet64-s-sct", {1: 5.10, 2: 3.05}),
    ("imagenet64-m-ect", {1: 3.67, 2: 2.35}), ("imagenet64-m-sct", {1: 3.30, 2: 2.13}),
    ("imagenet64-xl-ect", {1: 3.35, 2: 1.96}), ("imagenet64-l-sct", {})])
def test_imagenet64_presets_are_compared_size_for_size(preset, expected):
    rows = paper.matching_rows(sct.config.get_preset(preset))
    assert {r.steps: r.fid for r in rows} == expected
    assert all(not r.guided for r in rows)  # never an unguided S run against the guided 2.42 / 1.55


def test_guided_sct_m_is_the_abstracts_headline():
    rows = paper.matching_rows(sct.config.get_preset("imagenet64-m-sct"), guided=True)
    assert {r.steps: r.fid for r in rows} == {1: 2.42, 2: 1.55}
    assert {r.source for r in rows} == {"SCT Table 3 (ImageNet-64)", "SCT abstract"}


def test_every_row_has_a_source_and_every_extracted_row_says_so():
    for r in paper.ROWS:
        assert r.source and r.fid > 0 and r.nfe >= r.steps
        if "Table" in r.source:
            assert "third-party text extraction" in r.caveat, r
    assert paper.comparison(sct.config.get_preset("cifar10-sct"))[0]["caveat"]


def test_claims_are_numbered_once_and_point_at_existing_chapters():
    from pathlib import Path

    ids = [c.id for c in paper.CLAIMS]
    assert ids == list(range(1, len(ids) + 1))
    book = Path(__file__).resolve().parents[1] / "book"
    for c in paper.CLAIMS:
        assert c.claim and c.where and c.experiment
        assert (book / f"{c.chapter}.md").exists(), c
    assert paper.claim(4).chapter == "mdp_td"
    with pytest.raises(KeyError, match="numbered 1"):
        paper.claim(99)
