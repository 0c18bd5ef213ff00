"""Users' models as they are written (tsquant.normalise): functional and in-place ReLUs,
view-flatten, conv biases with affine BN, option-A shortcuts, projection shortcuts, Sequential
stacks, adaptive pooling, torch.compile. Each one runs prepare_step1 -> transform -> export ->
integer runtime and agrees with float64 PyTorch on every prediction."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tsquant
from tsquant import SolverConfig, SparseQuantizer, TransformConfig
from tsquant.export import IntegerRuntime, export_model
from tsquant.export.verify import quantizer_codes
from tsquant.normalise import normalise, unwrap
from tsquant.surgery import SurgeryError, analyse

from bn_helpers import with_bn_statistics


class OptionA(nn.Module):
    """Parameter-free shortcut of the popular CIFAR ResNets: subsample and zero-pad channels."""

    def __init__(self, planes):
        super().__init__()
        self.planes = planes

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.planes // 4, self.planes // 4))


class FunctionalBlock(nn.Module):
    """CIFAR ResNet block as public repositories write it: affine BN, F.relu, `out +=`."""

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = OptionA(planes) if stride != 1 else nn.Sequential()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        out = F.relu(out)
        return out


class CifarResNetFunctional(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(FunctionalBlock(8, 8), FunctionalBlock(8, 8))
        self.layer2 = nn.Sequential(FunctionalBlock(8, 16, stride=2))
        self.linear = nn.Linear(16, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer2(self.layer1(out))
        out = F.adaptive_avg_pool2d(out, 1)
        out = out.view(out.size(0), -1)
        return self.linear(out)


class ProjectionBlock(nn.Module):
    """ResNet-18-style block: 1x1 projection shortcut, torch.relu and x.relu_()."""

    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential(
            nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
        )

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        out.relu_()
        return out


class ResNetProjection(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True)
        )
        self.block1 = ProjectionBlock(8, 16, 2)
        self.block2 = ProjectionBlock(16, 16, 1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(x.mean((2, 3)))


class VGGStyle(nn.Module):
    """torchvision-style VGG: Sequential features with biased convs, affine BN,
    ReLU(inplace=True), max pooling, `view(size(0), -1)`, dropout, a 3-layer classifier."""

    def __init__(self, num_classes=10):
        super().__init__()
        layers, c = [], 3
        for width in (8, "M", 16, 16, "M"):
            if width == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width)]
                layers.append(nn.ReLU(inplace=True))
                c = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Dropout(),
            nn.Linear(16 * 2 * 2, 32, bias=False),
            nn.BatchNorm1d(32),
            nn.ReLU(inplace=True),
            nn.Linear(32, num_classes),
        )

    def forward(self, x):
        x = self.features(x)
        x = x.view(x.size(0), -1)
        return self.classifier(x)


class FlattenMethods(nn.Module):
    """`reshape(shape[0], -1)`, `x.relu()` and F.max_pool2d / F.avg_pool2d calls."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=True), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=True), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 2 * 2, num_classes)

    def forward(self, x):
        x = F.max_pool2d(self.bn1(self.conv1(x)).relu(), 2)
        x = F.avg_pool2d(F.relu(self.bn2(self.conv2(x)), inplace=True), 2)
        return self.fc(x.reshape(x.shape[0], -1))


MODELS = {
    "cifar resnet, functional relu, option-A, +=": CifarResNetFunctional,
    "resnet, projection shortcuts, relu_": ResNetProjection,
    "vgg, sequential, biased convs, view-flatten": VGGStyle,
    "functional pools, reshape, x.relu()": FlattenMethods,
}


def images(n=32, seed=0):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(MODELS))
def test_normalised_model_computes_the_same_function(name):
    torch.manual_seed(0)
    x = images()
    model = with_bn_statistics(MODELS[name](), x, random_affine=True)
    normalised = normalise(model)
    assert isinstance(normalised, torch.fx.GraphModule)
    with torch.no_grad():
        torch.testing.assert_close(normalised(x), model(x), rtol=1e-5, atol=1e-5)
    analyse(normalised)  # every idiom is now something the analysis understands
    # the caller's model is not changed
    assert any(isinstance(m, nn.Conv2d) and m.bias is not None for m in model.modules()) == (
        name.startswith(("vgg", "functional pools"))
    )


@pytest.mark.parametrize("name", list(MODELS))
def test_users_model_through_step2_export_and_integer_runtime(name, tmp_path):
    torch.manual_seed(0)
    x = images(48)
    model = with_bn_statistics(MODELS[name](), x, random_affine=True)
    step1 = tsquant.prepare_step1(model)
    assert any(isinstance(m, SparseQuantizer) for m in step1.modules())
    step1 = with_bn_statistics(step1, x, random_affine=True)
    cfg = TransformConfig(method=SolverConfig(iters=3), positions_per_image=8, verbose=False)
    quantized = tsquant.transform(step1, list(x.split(16)), cfg)
    exported = export_model(quantized, tmp_path / "export", [3, 8, 8])
    test = images(64, seed=1)
    logits_int, codes_int = IntegerRuntime(exported).run(test, keep=True)
    logits64, codes64 = quantizer_codes(quantized.double(), test.double())
    assert torch.equal(logits_int.argmax(1), logits64.argmax(1))
    assert codes_int.keys() == codes64.keys() and codes_int
    for key, codes in codes_int.items():
        assert torch.equal(codes, codes64[key].to(torch.int32)), key


def test_compiled_and_data_parallel_models_are_unwrapped():
    model = VGGStyle()
    assert unwrap(torch.compile(model)) is model
    assert unwrap(nn.DataParallel(model)) is model
    step1 = tsquant.prepare_step1(torch.compile(model))
    assert any(isinstance(m, SparseQuantizer) for m in step1.modules())


def test_affine_bn_kept_computes_the_fp_pre_activations():
    """affine_bn='keep': with its quantizers swapped back to ReLUs, the converted model is the FP
    model; 'fold' (the paper's non-affine BN) drops beta and |gamma| for step 1 to re-learn."""
    torch.manual_seed(0)
    x = images()
    model = with_bn_statistics(CifarResNetFunctional(), x, random_affine=True)

    def with_relus(net):
        for name, m in list(net.named_modules()):
            if isinstance(m, SparseQuantizer):
                parent, _, child = name.rpartition(".")
                setattr(net.get_submodule(parent) if parent else net, child, nn.ReLU())
        with torch.no_grad():
            return net.eval()(x)

    with torch.no_grad():
        fp = model(x)
    kept = tsquant.prepare_step1(model, affine_bn="keep")
    assert all(m.affine for m in kept.modules() if isinstance(m, nn.BatchNorm2d))
    torch.testing.assert_close(with_relus(kept), fp, rtol=1e-4, atol=1e-4)
    folded = tsquant.prepare_step1(model, affine_bn="fold")
    assert not any(m.affine for m in folded.modules() if isinstance(m, nn.BatchNorm2d))
    assert not torch.allclose(with_relus(folded), fp, atol=1e-2)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 0:
            return self.bn(self.conv(x))
        return x


class Gelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.flatten(F.gelu(self.bn(self.conv(x))).mean((2, 3)), 1))


@pytest.mark.parametrize(
    ("model", "fragment"),
    [
        (DataDependent(), "data-dependent Python control flow"),
        (Gelu(), "functional gelu in forward()"),
    ],
)
def test_what_cannot_be_normalised_is_one_line_naming_the_fix(model, fragment):
    with pytest.raises(SurgeryError, match=fragment) as info:
        tsquant.prepare_step1(model)
    assert "\n" not in str(info.value)


def test_transform_refuses_a_model_that_was_not_prepared():
    with pytest.raises(ValueError, match="prepare_step1"):
        tsquant.transform(VGGStyle().eval(), [images(4)], TransformConfig(verbose=False))


class InplaceModuleReLU(nn.Module):
    """`self.relu(out)` with ReLU(inplace=True) and its result unused: the data flow is the
    in-place write."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4 * 8 * 8, 2)

    def forward(self, x):
        out = self.bn(self.conv(x))
        self.relu(out)
        return self.fc(torch.flatten(out, 1))


def test_unused_result_of_an_inplace_relu_module_keeps_its_effect():
    torch.manual_seed(0)
    x = images(8)
    model = with_bn_statistics(InplaceModuleReLU(), x, random_affine=True)
    normalised = normalise(model)
    with torch.no_grad():
        torch.testing.assert_close(normalised(x), model(x), rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, nn.ReLU) and m.inplace for m in normalised.modules())
    step1 = tsquant.prepare_step1(model, keep_head_input_fp=False)  # quantize the head input
    assert any(isinstance(m, SparseQuantizer) for m in step1.modules())
    with torch.no_grad():
        assert not torch.equal(step1.eval()(x), normalised(x))  # the quantizer is in the path


class AdaptivePooled(nn.Module):
    """Quantizable, but an adaptive pool to 2x2 has no integer export (only to 1x1)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(2), nn.Linear(16, 2)

    def forward(self, x):
        x = F.relu(self.bn2(self.conv2(F.relu(self.bn(self.conv(x))))))
        return self.fc(torch.flatten(self.pool(x), 1))


def test_export_problems_are_reported_by_prepare_step1_before_any_training():
    with pytest.raises(
        SurgeryError, match=r"AdaptiveAvgPool2d.*not exportable.*check_export=False"
    ):
        tsquant.prepare_step1(AdaptivePooled())
    step1 = tsquant.prepare_step1(AdaptivePooled(), check_export=False)  # no export wanted
    assert any(isinstance(m, SparseQuantizer) for m in step1.modules())
