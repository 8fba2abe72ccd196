"""Preconditioning: EDM coefficients, the consistency boundary and the phased (PCM) form."""
import math

import pytest
import torch
from torch import nn

from sctlib.precond import (Precond, boundary_scalings, consistency_function, edm_scalings, phase_lower_edge,
                            phased)


class Inner(nn.Module):
    """A raw network F(x_in, c_noise, labels) whose output depends on all three inputs."""

    def __init__(self, dim=6, label_dim=0):
        super().__init__()
        torch.manual_seed(1)
        self.lin = nn.Linear(dim, dim)
        self.emb = nn.Linear(1, dim)
        self.lab = nn.Linear(label_dim, dim) if label_dim else None
        self.calls = []

    def forward(self, x_in, c_noise, labels):
        self.calls.append((x_in.detach().clone(), c_noise.detach().clone(), labels))
        h = self.lin(x_in) + self.emb(c_noise[:, None])
        if self.lab is not None:
            h = h + self.lab(labels)
        return torch.tanh(h) * 3.0


def test_edm_coefficients_match_hand_values():
    sd = 0.5
    for s in [0.002, 0.1, 0.5, 1.0, 80.0]:
        c_skip, c_out, c_in, c_noise = edm_scalings(torch.tensor(s, dtype=torch.float64), sd)
        assert math.isclose(c_skip.item(), sd**2 / (s**2 + sd**2), rel_tol=1e-14)
        assert math.isclose(c_out.item(), s * sd / math.sqrt(s**2 + sd**2), rel_tol=1e-14)
        assert math.isclose(c_in.item(), 1 / math.sqrt(s**2 + sd**2), rel_tol=1e-14)
        assert math.isclose(c_noise.item(), math.log(s) / 4, rel_tol=1e-14)
    # the ECT facts' quoted values at sigma = 0.821: c_skip 0.2706 (EDM) vs 0.2720 (boundary, sigma_min 0.003)
    s = torch.tensor(0.821, dtype=torch.float64)
    assert abs(edm_scalings(s)[0].item() - 0.2706) < 1e-4
    assert abs(boundary_scalings(s, 0.5, 0.003)[0].item() - 0.2720) < 1e-4


def test_precond_output_is_edm_formula():
    inner = Inner()
    D = Precond(inner, boundary="never")
    x = torch.randn(4, 6, dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.3, 2.0, 50.0])
    out = D(x, sigma)
    # Precond computes in float32; build the float64 reference from the same float32 inner output
    s = sigma.double()[:, None]
    c_skip, c_out, c_in = 0.25 / (s**2 + 0.25), s * 0.5 / (s**2 + 0.25).sqrt(), 1 / (s**2 + 0.25).sqrt()
    x_in, c_noise, _ = inner.calls[-1]
    assert torch.allclose(x_in.double(), c_in * x.float().double(), rtol=1e-6)
    assert torch.allclose(c_noise.double(), sigma.double().log() / 4, rtol=1e-6)
    F = inner(x_in, c_noise, None).double()
    assert torch.allclose(out.double(), c_skip * x + c_out * F, rtol=1e-5, atol=1e-6)


def test_boundary_always_is_identity_at_sigma_min():
    sigma_min = 0.002
    D = Precond(Inner(), boundary="always", sigma_min=sigma_min)
    x = torch.randn(5, 6) * 3
    for mode in (D.train, D.eval):
        mode()
        assert torch.equal(D(x, sigma_min), x)
        assert torch.equal(D(x, torch.full((5,), sigma_min)), x)
    # and it is not the identity elsewhere
    assert not torch.allclose(D(x, 0.5), x)


def test_boundary_eval_switches_with_mode():
    sigma = torch.tensor([0.003, 0.821, 5.0])
    D = Precond(Inner(), boundary="eval", sigma_min=0.003)
    x = torch.randn(3, 6)
    D.train()
    train_out = D(x, sigma)
    D_edm = Precond(Inner(), boundary="never", sigma_min=0.003)
    D_edm.load_state_dict(D.state_dict())
    D_edm.eval()
    assert torch.equal(train_out, D_edm(x, sigma)), "train mode must use the EDM coefficients"
    D.eval()
    eval_out = D(x, sigma)
    D_bnd = Precond(Inner(), boundary="always", sigma_min=0.003)
    D_bnd.load_state_dict(D.state_dict())
    assert torch.equal(eval_out, D_bnd(x, sigma)), "eval mode must use the boundary coefficients"
    assert torch.equal(eval_out[0], x[0])  # f(x, sigma_min) = x in eval mode
    assert not torch.equal(train_out[0], x[0])  # ... but not in train mode (ECT's asymmetry)


def test_phased_identity_at_every_edge_and_boundary():
    D = Precond(Inner(), boundary="never")
    edges = [0.002, 0.1, 0.821, 5.0]
    f = phased(D, edges)
    x = torch.randn(4, 6)
    for e in edges:
        assert torch.equal(f(x, e), x), f"phased form must equal x at the edge {e}"
    # between edges it is the DDIM form with the lower edge
    t = torch.tensor([0.05, 0.5, 2.0, 30.0])
    s = torch.tensor([0.002, 0.1, 0.821, 5.0])[:, None]
    expected = (s / t[:, None]) * x + (1 - s / t[:, None]) * D(x, t)
    assert torch.allclose(f(x, t), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(phase_lower_edge(t, edges), s.reshape(-1))


def test_consistency_function_single_phase_is_D():
    D = Precond(Inner(), boundary="never")
    x, t = torch.randn(3, 6), torch.tensor([0.1, 1.0, 10.0])
    f = consistency_function(D)
    assert torch.equal(f(x, t), D(x, t)) and f.edges == [0.0]
    with pytest.raises(ValueError, match="increasing"):
        phase_lower_edge(t, [1.0, 0.5])


def test_precond_labels_and_errors():
    inner = Inner(label_dim=3)
    D = Precond(inner, label_dim=3)
    x = torch.randn(2, 6)
    out_idx = D(x, 1.0, torch.tensor([0, 2]))
    out_hot = D(x, 1.0, torch.eye(3)[[0, 2]])
    assert torch.equal(out_idx, out_hot)
    with pytest.raises(ValueError, match="class-conditional"):
        D(x, 1.0)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        D(x, 1.0, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="boundary"):
        Precond(Inner(), boundary="sometimes")
