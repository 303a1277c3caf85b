"""The inference form computes the same function: BatchNorm folding, execution forms, memory formats."""

import pytest
import torch
from torch import nn

from datd.decompose import cp, svd, tucker2
from datd.inference import as_form, fold_batchnorms, for_inference, form_names
from datd.layers import CPConv2d, Tucker2Conv2d, factorize

from test_layers import CONVS, FITS, fit_conv


def relative_difference(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("fit", FITS)
@pytest.mark.parametrize("geometry", CONVS)
def test_every_execution_form_computes_the_same_function(fit, geometry):
    torch.manual_seed(0)
    conv = nn.Conv2d(**CONVS[geometry])
    module = factorize(conv, fit_conv(fit, conv))
    x = torch.randn(2, 12, 11, 13)
    expected = module(x)
    forms = form_names(module)
    assert forms[0] == "chain" and len(forms) == {"svd": 1, "tucker2": 3, "cp": 3}[fit]
    for form in forms:
        with torch.no_grad():
            got = as_form(module, form)(x)
        assert got.shape == expected.shape
        assert relative_difference(got, expected) < 1e-5, form
    with pytest.raises(ValueError, match="no execution form"):
        as_form(module, "nonsense")


def test_merged_forms_have_the_expected_structure():
    conv = nn.Conv2d(16, 24, 3, padding=1)
    tk = factorize(conv, tucker2(conv.weight.detach(), None, (6, 4), max_iter=1))
    merged = as_form(tk, "merge_in")
    assert [m.kernel_size for m in merged] == [(3, 3), (1, 1)] and merged.first.out_channels == 6
    merged = as_form(tk, "merge_out")
    assert [m.kernel_size for m in merged] == [(1, 1), (3, 3)] and merged.last.in_channels == 4
    cpm = factorize(conv, cp(conv.weight.detach(), None, 5, max_iter=1))
    depthwise = as_form(cpm, "depthwise")
    assert depthwise.spatial.groups == 5 and depthwise.spatial.kernel_size == (3, 3)


class ConvBNNet(nn.Module):
    """conv→BN→ReLU twice (one conv with bias, one factorized), a conv whose output feeds a BN *and* the
    residual (not foldable), and a BN applied to an input (not foldable)."""

    def __init__(self):
        super().__init__()
        self.bn_in = nn.BatchNorm2d(3)
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(self.bn_in(x))))
        x = torch.relu(self.bn2(self.conv2(x)))
        y = self.conv3(x)
        return self.bn3(y) + y


def randomized(model):
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def test_batchnorm_folding_is_exact_and_only_where_allowed():
    model = randomized(ConvBNNet())
    model.conv2 = Tucker2Conv2d.from_conv(model.conv2, (8, 8))
    x = torch.randn(4, 3, 10, 10)
    expected = model(x)
    folded = for_inference(model)
    with torch.no_grad():
        assert relative_difference(folded(x), expected) < 1e-5
    assert isinstance(folded.bn1, nn.Identity) and isinstance(folded.bn2, nn.Identity)
    assert isinstance(folded.bn_in, nn.BatchNorm2d) and isinstance(folded.bn3, nn.BatchNorm2d)
    assert folded.conv2.last.bias is not None
    assert isinstance(model.bn1, nn.BatchNorm2d)  # the input model is untouched
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorms(ConvBNNet().train())


def test_untraceable_models_keep_their_batchnorms_with_a_warning():
    class Dynamic(nn.Sequential):
        def forward(self, x):
            return super().forward(x) if x.sum() > -1e9 else x  # data-dependent control flow

    model = randomized(Dynamic(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    with pytest.warns(UserWarning, match="cannot be traced"):
        folded = for_inference(model)
    assert isinstance(folded[1], nn.BatchNorm2d)


@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
def test_compressed_cifar_resnet_in_inference_form_is_unchanged(compressed_resnet20, memory_format):
    compressed = compressed_resnet20
    layers = {n: m for n, m in compressed.named_modules() if isinstance(m, (Tucker2Conv2d, CPConv2d))}
    forms = {n: form_names(m)[-1] for n, m in layers.items()}
    fast = for_inference(compressed, forms=forms, memory_format=memory_format)
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        assert relative_difference(fast(x), compressed(x)) < 1e-5
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    with pytest.raises(ValueError, match="not factorized"):
        for_inference(compressed, forms={"layer1.0.bn1": "chain"})
    with pytest.raises(ValueError, match="memory_format"):
        for_inference(compressed, memory_format="nhwc")
