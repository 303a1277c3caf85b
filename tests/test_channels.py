"""Channel pruning on models (``datd.channels``): which chains exist, their exact cost, the surgery, save/load."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import datd
from datd.channels import MARK, find_chains, profile_chains, prune_chain
from datd.decompose import prune
from datd.errors import DatdError
from datd.evaluate import count_macs, count_params
from datd.layers import Geometry, dense_cost, pruned_cost
from datd.models import load_model


class Inverted(nn.Module):
    """An inverted residual (expand → BN → ReLU6 → depthwise → BN → ReLU6 → project), a residual add, then a head
    that pools, flattens and classifies."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.expand = nn.Conv2d(8, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.dw = nn.Conv2d(24, 24, 3, padding=1, groups=24, bias=False)
        self.bn2 = nn.BatchNorm2d(24)
        self.project = nn.Conv2d(24, 8, 1, bias=False)
        self.last = nn.Conv2d(8, 32, 1)
        self.act = nn.PReLU(32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        y = F.relu6(self.bn2(self.dw(F.relu6(self.bn1(self.expand(x))))))
        x = x + self.project(y)  # the stem's output is used twice: no chain stem → expand
        x = self.act(self.last(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Flattening(nn.Module):
    """conv → ReLU → max-pool → flatten → Linear (a VGG-style head: the Linear reads 2×2 maps per channel)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 2 * 2, 5)

    def forward(self, x):
        return self.fc(torch.flatten(F.max_pool2d(F.relu(self.conv(x)), 4), 1))


class NoChains(nn.Module):
    """Every path breaks a chain: concatenation, gating by a second branch, a grouped conv, a reshape."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.c = nn.Conv2d(8, 8, 1)
        self.gate = nn.Conv2d(8, 8, 1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.d = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.c(torch.cat([self.a(x), self.b(x)], 1))
        x = x * torch.sigmoid(self.gate(x))
        return self.d(self.grouped(x)).reshape(x.shape[0], -1)


def _trained_bn(model):
    """Give the BatchNorms non-trivial running statistics and affine parameters."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def test_chains_are_found_only_through_channelwise_single_use_paths():
    chains = find_chains(Inverted())
    assert set(chains) == {"project", "head"}
    assert chains["project"].producer == "expand" and chains["project"].between == ("bn1", "dw", "bn2")
    assert chains["project"].channels == 24 and chains["project"].block == 1
    assert chains["head"].producer == "last" and chains["head"].between == ("act",)
    flat = find_chains(Flattening())
    assert flat["fc"].producer == "conv" and flat["fc"].channels == 6 and flat["fc"].block == 4
    assert find_chains(NoChains()) == {}
    assert set(find_chains(Inverted(), consumers={"head"})) == {"head"}


def test_chains_of_real_architectures():
    r20 = find_chains(load_model("cifar_resnet20").model)
    assert len(r20) == 9 and all(c.producer == q.replace("conv2", "conv1") and c.block == 9 for q, c in r20.items())
    mobile = find_chains(load_model("mobilenet_v2", "none").model)
    assert mobile["classifier.1"].producer == "features.18.0" and mobile["classifier.1"].channels == 1280
    assert mobile["features.2.conv.2"].between == ("features.2.conv.0.1", "features.2.conv.1.0", "features.2.conv.1.1")
    # a bottleneck's middle conv consumes one chain and would produce the next: chains share no layer
    r50 = find_chains(load_model("resnet50", "none").model)
    layers = [n for c in r50.values() for n in (c.producer, c.consumer)]
    assert len(layers) == len(set(layers)) and "layer1.0.conv2" in r50


@pytest.mark.parametrize("model_type, consumer", [(Inverted, "project"), (Inverted, "head"), (Flattening, "fc")])
def test_pruned_chain_computes_what_the_reconstructed_weight_computes_and_costs_what_pruned_cost_says(model_type,
                                                                                                     consumer):
    """The shrunk model equals the original model whose consumer weight is replaced by the fit's reconstruction
    (+ its bias), and the change of the whole model's parameters and MACs is ``pruned_cost`` − the dense cost."""
    torch.manual_seed(1)
    model = _trained_bn(model_type())
    x = torch.randn(4, 3, 8, 8)
    chain = find_chains(model)[consumer]
    q = model.get_submodule(consumer)
    d = q.weight[0].numel()
    feats = torch.randn(200, d, dtype=torch.float64)
    sigma = feats.T @ feats / 200
    fit = prune(q.weight.detach().double(), sigma, 3, channels=chain.channels)
    bias = torch.randn(q.weight.shape[0], dtype=torch.float64)

    reference = model_type()
    reference.load_state_dict(model.state_dict())
    reference.eval()
    ref_q = reference.get_submodule(consumer)
    ref_q.weight.data = fit.reconstruct().float().reshape(ref_q.weight.shape)
    ref_q.bias = nn.Parameter(bias.float())

    pruned = model_type()
    pruned.load_state_dict(model.state_dict())
    pruned.eval()
    prune_chain(pruned, chain, fit.kept, fit.weight, bias)
    assert torch.allclose(pruned(x), reference(x), atol=1e-5, rtol=1e-5)
    assert getattr(pruned.get_submodule(chain.producer), MARK)

    unit = profile_chains(model, {consumer: chain}, x[:1])[consumer].unit
    hw = (8, 8) if isinstance(q, nn.Conv2d) else (1, 1)
    g = Geometry.of(q, hw, hw, add_bias=True)
    g = Geometry(g.weight_shape, g.groups, g.bias, g.input_hw, g.output_hw, True, chain.channels, unit)
    change, dense = pruned_cost(g, 3), dense_cost(g)  # the consumer gains a bias where it had none: both count it
    assert count_params(pruned) - count_params(model) == change.params - dense.params
    assert count_macs(pruned, x[:1]) - count_macs(model, x[:1]) == change.macs - dense.macs


def test_pruned_models_save_and_load_to_the_same_outputs(tmp_path):
    torch.manual_seed(2)
    model = _trained_bn(Inverted())
    chains = find_chains(model)
    for consumer, chain in chains.items():
        q = model.get_submodule(consumer)
        fit = prune(q.weight.detach().double(), None, 5, channels=chain.channels)
        prune_chain(model, chain, fit.kept, fit.weight, torch.zeros(q.weight.shape[0], dtype=torch.float64))
    x = torch.randn(2, 3, 8, 8)
    datd.save(model, tmp_path / "m", source={"model": "Inverted"})
    config = __import__("json").loads((tmp_path / "m" / "config.json").read_text())
    assert config["channels"]["expand"] == {"in": 8, "out": 5, "bias": False}
    assert config["channels"]["project"] == {"in": 5, "out": 8, "bias": True}
    assert config["channels"]["bn1"] == {"out": 5} and config["channels"]["act"] == {"out": 5}
    reloaded = datd.load(tmp_path / "m", Inverted())
    assert torch.equal(reloaded(x), model(x))
    assert torch.allclose(datd.load(tmp_path / "m", Inverted(), inference=True)(x), model(x), atol=1e-5)
    again = datd.load(tmp_path / "m", Inverted())  # reloaded models save again
    datd.save(again, tmp_path / "m2")
    assert torch.equal(datd.load(tmp_path / "m2", Inverted())(x), model(x))
    config["channels"]["expand"] = {"out": 0}
    (tmp_path / "m" / "config.json").write_text(__import__("json").dumps(config))
    with pytest.raises(DatdError, match="positive integer 'in'/'out' channel counts"):
        datd.load(tmp_path / "m", Inverted())
    config["channels"] = {"nothing.here": {"out": 3}}
    (tmp_path / "m" / "config.json").write_text(__import__("json").dumps(config))
    with pytest.raises(DatdError, match="the architecture the compressed model was made from"):
        datd.load(tmp_path / "m", Inverted())
