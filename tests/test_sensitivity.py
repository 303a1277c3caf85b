"""Fisher sensitivities against their closed form for a softmax classifier."""

import torch
from torch import nn

from datd.sensitivity import output_sensitivity


def test_logit_sensitivity_is_p_times_one_minus_p():
    # For logits z, g = ∂ log p(ŷ)/∂z = e_ŷ − p, so E_ŷ[g_c²] = p_c (1 − p_c).
    torch.manual_seed(0)
    head = nn.Linear(6, 5)
    model = nn.Sequential(head)
    x = torch.randn(8000, 6)
    s = output_sensitivity(model, x.split(500), {"0": head}, progress=False)["0"]
    p = torch.softmax(head(x), dim=1).double()
    expected = (p * (1 - p)).mean(0)
    assert torch.allclose(s.total, expected, rtol=0.05)
    assert torch.equal(s.pooled, s.total) and torch.equal(s.spread, torch.zeros_like(s.total))  # one position


def test_sensitivity_sums_over_positions_and_respects_max_images():
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    model = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    x = torch.randn(64, 3, 6, 6)
    f = output_sensitivity(model, [x[:32], x[32:]], {"0": conv}, max_images=40, seed=3, progress=False)["0"].total
    again = output_sensitivity(model, [x[:32], x[32:]], {"0": conv}, max_images=40, seed=3, progress=False)["0"].total
    assert f.shape == (4,) and (f >= 0).all() and f.sum() > 0
    assert torch.equal(f, again)  # seeded
    assert not any(p.grad is not None for p in model.parameters())  # leaves no gradients behind


def test_a_layer_before_global_pooling_has_only_pooled_sensitivity():
    # conv → global average → linear: the gradient is the same at all P positions of an image, so the
    # pooled weight A = E(Σ_p g)² is P times the per-position total f = E Σ_p g², and nothing is left for B.
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    model = nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    s = output_sensitivity(model, [torch.randn(32, 3, 5, 5)], {"0": conv}, progress=False)["0"]
    assert torch.allclose(s.pooled, 25 * s.total, rtol=1e-5)  # the sums over positions reduce in float32 (~1e-7)
    assert torch.allclose(s.spread, torch.zeros(4, dtype=torch.float64), atol=1e-6 * float(s.total.max()))
