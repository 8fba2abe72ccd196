"""SCT's 'all' reference source under torch.distributed: two gloo processes on the CPU.

The gathered references must be the global batch in rank order with the labels aligned, and each rank's
per-sample SCT loss must equal the single-process loss on the global batch (with the same t and eps).
"""
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from sctlib.config import LossConfig
from sctlib.losses import SCTLoss

ROOT = Path(__file__).resolve().parents[1]
B, D, WORLD = 8, 6, 2

COMMON = textwrap.dedent("""
    import torch
    from torch import nn
    from sctlib.precond import Precond

    B, D = 8, 6

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(D + 1 + 3, D)

        def forward(self, x, c_noise, labels):
            return self.lin(torch.cat([x, c_noise[:, None], labels], dim=1))

    def problem():
        g = torch.Generator().manual_seed(0)
        x0 = (torch.rand(B, D, generator=g) * 2 - 1) * 0.3
        labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0])
        t = torch.exp(0.5 + torch.randn(B, generator=g))   # moderate t: the references share the weight
        eps = torch.randn(B, D, generator=g)
        torch.manual_seed(1)
        net = Precond(Net(), label_dim=3, boundary="never")
        return x0, labels, t, eps, net
""")

WORKER = COMMON + textwrap.dedent("""
    import sys
    import torch.distributed as dist
    import sctlib.losses as L
    from sctlib.config import LossConfig
    from sctlib.targets import gather_references

    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    x0, labels, t, eps, net = problem()
    n = B // world
    mine = slice(rank * n, (rank + 1) * n)
    ref, ref_labels = gather_references(x0[mine], labels[mine], "all")
    # The loss draws t and eps for its local rows; hand it the global draws of those rows.
    L.sample_t_lognormal = lambda *a, **k: t[mine].clone()
    L.noise_like = lambda x: eps[mine].clone()
    loss_fn = L.SCTLoss(LossConfig(task="sct", ref_source="all", P_mean=0.5, q=2.0, double_nimg=1000))
    loss, st = loss_fn(net, x0[mine], torch.eye(3)[labels[mine]], nimg=0)
    torch.save({"ref": ref, "ref_labels": ref_labels, "loss": loss.detach(), "ess": st["ess"],
                "n_refs": st["n_refs"]}, f"{out}/rank{rank}.pt")
    from sctlib.train import leave_process_group
    leave_process_group()  # together: a rank exiting first can abort the other over gloo
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_all_references_are_the_global_batch_and_the_loss_matches_one_process(tmp_path, monkeypatch):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": str(WORLD), "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path)], env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(WORLD)]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    ns = {}
    exec(COMMON, ns)
    x0, labels, t, eps, net = ns["problem"]()
    for r in res:  # the global batch, rank 0's rows first, labels aligned with their images
        assert torch.equal(r["ref"], x0) and torch.equal(r["ref_labels"], labels)

    # One process on the global batch: its 'batch' references are the same set.
    import sctlib.losses as L

    monkeypatch.setattr(L, "sample_t_lognormal", lambda *a, **k: t.clone())
    monkeypatch.setattr(L, "noise_like", lambda x: eps.clone())
    loss_fn = SCTLoss(LossConfig(task="sct", ref_source="batch", P_mean=0.5, q=2.0, double_nimg=1000))
    loss, st = loss_fn(net, x0, torch.eye(3)[labels], nimg=0)
    got = torch.cat([r["loss"] for r in res])
    assert torch.allclose(got, loss.detach(), rtol=1e-6, atol=1e-7)
    assert torch.allclose(torch.cat([r["ess"] for r in res]), st["ess"], rtol=1e-6)
    # class 0 has 4 images in the global batch but at most 2 on a rank: the gather matters
    assert torch.cat([r["n_refs"] for r in res]).tolist() == st["n_refs"].tolist() == [4, 2, 2, 4, 2, 2, 4, 4]
    assert bool((st["ess"] > 1.2).any())
