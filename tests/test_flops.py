"""sctlib.flops: model FLOPs of the training step (counted while a real step runs) and MFU."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import sctlib as sct
from sctlib.config import get_preset


def _forward_flops(cfg, batch):
    """FLOPs of one network call (no gradient) on ``batch`` images: the independent yardstick."""
    net = sct.networks.build_network(cfg.net).eval()
    x = torch.randn(batch, cfg.net.img_channels, cfg.net.img_resolution, cfg.net.img_resolution)
    labels = torch.nn.functional.one_hot(torch.arange(batch) % cfg.net.label_dim, cfg.net.label_dim).float() \
        if cfg.net.label_dim else None
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(x, torch.full((batch,), 0.5), labels)
    return counter.get_total_flops() / batch


@pytest.mark.parametrize("preset", ["digits-ect", "digits-sct"])
def test_step_flops_are_one_student_pass_with_backward_and_one_target_pass(preset):
    """A step = the student's forward (F) and backward (about 2F: input and weight gradients; the first layer
    needs no input gradient, so a little less) plus the target's forward without gradient (F): between 3.8F
    and 4F per image. A step that differentiated the target pass too would count ~6F, one that skipped it
    ~3F. SCT counts as ECT (its reference arithmetic is not model work), and the count is linear in the batch."""
    cfg = get_preset(preset)
    fwd = _forward_flops(cfg, 4)
    per_img = sct.flops.step_flops_per_image(cfg, batch=4)
    assert 3.8 * fwd < per_img <= 4.0 * fwd + 1, (per_img / fwd)
    assert sct.flops.step_flops_per_image(cfg, batch=2) == pytest.approx(per_img, rel=1e-12)
    if preset == "digits-sct":
        # counted as it runs, SCT's step adds only its reference arithmetic (no further network call: that
        # would add at least one forward pass, F)
        own = sct.flops.step_flops_per_image(cfg, batch=4, as_ect=False)
        assert 0 < own - per_img < 0.1 * fwd, ((own - per_img) / fwd)


def test_mfu_and_peaks():
    assert sct.flops.peak_tflops("NVIDIA H200") == 989.4 and sct.flops.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert sct.flops.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0 and sct.flops.peak_tflops("cpu") is None
    assert sct.flops.peak_tflops("NVIDIA H100 PCIe") == 756.0 and sct.flops.peak_tflops("NVIDIA H200 NVL") == 835.0
    # 972 img/s x 170 GFLOP per image on an H100 SXM: 16.7% of its 989.4 TFLOP/s
    assert sct.flops.mfu(972.0, 170e9, "NVIDIA H100") == pytest.approx(972 * 170e9 / 989.4e12)
    assert sct.flops.mfu(972.0, 170e9, "some GPU") is None
    with pytest.raises(ValueError, match="batch"):
        sct.flops.step_flops_per_image(get_preset("digits-ect"), batch=0)


def test_flops_cli_writes_its_record_and_refuses_bad_input_in_one_line(tmp_path, capsys):
    import json

    out = tmp_path / "f.json"
    assert sct.flops.main(["--presets", "digits-ect", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["rows"][0]["preset"] == "digits-ect" and rec["rows"][0]["gflop_per_img"] > 0
    assert rec["command"].endswith(f"--presets digits-ect --out {out}")
    assert sct.flops.main(["--presets", "digits-ect,nope"]) == 2          # checked before any counting
    assert sct.flops.main(["--presets", "digits-ect", "--out", str(tmp_path / "no" / "f.json")]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'nope'" in err and "does not exist" in err and "Traceback" not in err
