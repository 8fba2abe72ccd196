"""The GPU pipelines run end to end on the CPU with tiny settings (plumbing: scratch init, a random-image
EDM zip, Inception with random weights, so the FIDs mean nothing)."""
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


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
    pm.execute_notebook(str(ROOT / "pipelines" / f"{notebook}.ipynb"), str(out), kernel_name="python3",
                        cwd=str(ROOT / "pipelines"), progress_bar=False, parameters=dict(
                            preset=preset, run_name="t", runs_dir=str(tmp_path / "runs"), data_path=str(zip_path),
                            init="", overrides=tiny, fid_images=8, fid_seeds=[0, 1], steps=[1, 2],
                            inception_weights=str(random_inception_weights)))
    rec = json.loads((tmp_path / "runs" / "t" / "results.json").read_text())
    for k in ("fid_1step", "fid_2step"):
        r = rec["results"][k]
        assert len(r["values"]) == 2 and r["min"] <= r["mean"] and r["num_images"] == 8
    assert rec["paper"]  # the paper's values travel with the record
    assert (tmp_path / "runs" / "t" / "final.safetensors").exists()
