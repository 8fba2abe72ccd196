"""The pipelines as a newcomer meets them: every parameter shows in ``papermill --help-notebook`` with a type
and takes a plain ``-p`` value; a GPU-scale preset refuses to start on a CPU with a message that says what
to do; the GPU pipelines run end to end on the CPU with tiny settings (plumbing: scratch init, a random-image
EDM zip, Inception with random weights, so the FIDs mean nothing). ``make test`` also runs every pipeline in
smoke mode through nbmake."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sctlib as sct

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = sorted((ROOT / "pipelines").glob("*.ipynb"))


def _parameters(nb_path):
    nb = json.loads(nb_path.read_text())
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"{nb_path.name}: one cell tagged 'parameters'"
    src = "".join(cells[0]["source"])
    return [m.group(1) for m in re.finditer(r"^(\w+)\s*[:=]", src, flags=re.M)], src


@pytest.mark.parametrize("nb", PIPELINES, ids=lambda p: p.stem)
def test_every_parameter_shows_in_help_notebook_with_a_type(nb):
    names, src = _parameters(nb)
    assert "smoke" in names, f"{nb.name} has no smoke parameter"
    papermill = Path(sys.executable).with_name("papermill")
    out = subprocess.run([str(papermill), "--help-notebook", str(nb)], capture_output=True, text=True,
                         timeout=120).stdout
    assert "Unable to parse" not in out
    for name in names:
        m = re.search(rf"^\s+{name}: (\w+) \(default", out, flags=re.M)
        assert m, f"{nb.name}: parameter {name!r} missing from --help-notebook:\n{out}"
        assert m.group(1) in ("str", "int", "float", "bool"), f"{name}: {m.group(1)} is not a plain -p value"
    values = [ln.split("#")[0] for ln in src.splitlines()]
    assert not any("[" in v or "{" in v for v in values), "list/dict defaults do not take a plain -p value"


def test_plain_values_are_parsed():
    assert sct.pipeline.parse_list("0,1, 2") == [0, 1, 2] and sct.pipeline.parse_list(2) == [2]
    assert sct.pipeline.parse_list("") == []
    assert sct.pipeline.parse_overrides("total_nimg=64 net.channel_mult=1,1") == ["total_nimg=64",
                                                                                   "net.channel_mult=1,1"]
    with pytest.raises(ValueError, match="key=value"):
        sct.pipeline.parse_overrides("total_nimg 64")
    with pytest.raises(ValueError, match="comma-separated"):
        sct.pipeline.parse_list("1,two")


def test_gpu_scale_preset_refuses_a_cpu_with_a_message_that_says_what_to_do(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cifar10-sct", "imagenet64-s-ect", "imagenet64-xl-sct"):
        with pytest.raises(sct.pipeline.GPUScaleOnCPU, match="smoke True.*allow_cpu True"):
            sct.pipeline.check_device(sct.config.get_preset(name))
        sct.pipeline.check_device(sct.config.get_preset(name), allow_cpu=True)  # asked for: allowed
    sct.pipeline.check_device(sct.config.get_preset("digits-sct"))  # CPU-scale: always allowed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    sct.pipeline.check_device(sct.config.get_preset("cifar10-sct"))


def test_training_prints_text_progress_lines(tmp_path, capsys):
    cfg = sct.config.override(sct.config.get_preset("toy2d-ect"), total_nimg=1024, tick_nimg=256, batch_size=256,
                              checkpoint_nimg=1024, device="cpu")
    sct.train.train(cfg, tmp_path / "run", progress=True)
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if "img/s" in ln]
    assert lines, out
    assert re.search(r"\[toy2d-ect\] 1\.02k/1\.02k img \(100\.0%\) \| [\d,]+ img/s \| loss [\d.e+-]+ \| "
                     r"elapsed \d+s \| ETA 0s", lines[-1]), lines[-1]
    assert "done: 1.02k images" in out


@pytest.mark.slow
@pytest.mark.parametrize("notebook,preset,res", [("train_cifar10", "cifar10-ect", 32),
                                                 ("train_imagenet64", "imagenet64-s-sct", 64)])
def test_training_pipeline_plumbing_with_tiny_settings(notebook, preset, res, tmp_path, random_inception_weights):
    import papermill as pm
    from sctlib.data import write_edm_zip

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (48, 3, res, res), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 1000, (48,), generator=g).tolist() if "imagenet" in preset else None
    zip_path = write_edm_zip(tmp_path / "data.zip", images, labels)
    tiny = ["device=cpu", "net.model_channels=16", "net.num_blocks=1", "total_nimg=64", "batch_size=16",
            "checkpoint_nimg=32", "tick_nimg=16", "eval.num_samples=8"]
    tiny += ["net.channel_mult=1,1", "net.attn_resolutions=16"] if "cifar" in preset else \
            ["net.channel_mult=1,1,1,1", "net.attn_resolutions=8", "phema_stds=0.05"]
    out = tmp_path / "out.ipynb"
    # plain string values, as `papermill -p name value` passes them
    pm.execute_notebook(str(ROOT / "pipelines" / f"{notebook}.ipynb"), str(out), kernel_name="python3",
                        cwd=str(ROOT / "pipelines"), progress_bar=False, parameters=dict(
                            preset=preset, run_name="t", runs_dir=str(tmp_path / "runs"), data_path=str(zip_path),
                            init="", overrides=" ".join(tiny), fid_images=8, fid_seeds="0,1", steps="1,2",
                            inception_weights=str(random_inception_weights)))
    rec = json.loads((tmp_path / "runs" / "t" / "results.json").read_text())
    for k in ("fid_1step", "fid_2step"):
        r = rec["results"][k]
        assert len(r["values"]) == 2 and r["min"] <= r["mean"] and r["num_images"] == 8
    # the record holds the paper's like-for-like rows; a 16-channel network matches none (never a wrong one)
    assert rec["paper"] == []
    assert (tmp_path / "runs" / "t" / "final.safetensors").exists()
    # the progress lines are in the saved notebook (text, not a widget stuck at 0 %)
    text = out.read_text()
    assert "img/s" in text and "ETA" in text


def test_feature_extraction_prints_text_progress_lines(capsys):
    import io

    import torch

    from sctlib.metrics.inception import extract_features
    from sctlib.progress import iter_progress

    # the wrapper: batches pass through unchanged; a line per interval (every_s=0: each batch) and a last line
    buf = io.StringIO()
    batches = [torch.zeros(3, 2), torch.zeros(4, 2)]
    assert list(iter_progress(iter(batches), desc="f", total=7, every_s=0, stream=buf)) == batches
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("[f] 3/7 images") and "ETA" in lines[0]
    assert lines[1].startswith("[f] 7/7 images") and lines[-1].startswith("[f] done: 7 images")

    # FID feature extraction reports through it (text, not a tqdm widget)
    ext = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(4))
    imgs = torch.randint(0, 255, (10, 3, 8, 8), dtype=torch.uint8)
    feats = extract_features(imgs, lambda x: ext(x.float()), batch_size=4, device="cpu", progress=True)
    assert feats.shape == (10, 4)
    out = capsys.readouterr().out
    assert "[features] done: 10 images" in out and "it/s" not in out
