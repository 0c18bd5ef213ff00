"""A small TSQ model with random ternary codes (no training needed to test the export)."""

import torch

from tsquant import prepare_step1
from tsquant.models import build_model
from tsquant.surgery import analyse, quantizable_layers, write_back

SHAPES = {"resnet20": (3, 16, 16), "small_cnn": (1, 28, 28)}


def random_tsq_model(name: str, grid="ternary", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    c, h, _ = SHAPES[name]
    extra = {"width": 4} if name == "resnet20" else {}
    model = build_model(name, num_classes=10, in_channels=c, image_size=h, **extra).eval()
    for bn in model.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.running_mean.normal_(0, 0.1)
            bn.running_var.uniform_(0.5, 2)
    model = prepare_step1(model).eval()
    low, high = (-1, 1) if grid == "ternary" else (-3, 3)
    for layer in quantizable_layers(analyse(model)):
        module = model.get_submodule(layer.name)
        c_out = module.weight.shape[0]
        codes = torch.randint(low, high + 1, (c_out, module.weight[0].numel()))
        if grid != "ternary":
            codes = 2 * torch.div(codes, 2, rounding_mode="floor") + 1  # odd mid-rise levels
        alpha = torch.rand(c_out) * 0.1 + 0.02
        write_back(model, layer, codes, alpha, torch.randn(c_out) * 0.3, grid)
    return model


def int8_boundary_small_cnn(
    images: torch.Tensor, iters: int = 2, width: int = 4
) -> torch.nn.Module:
    """A Fashion-MNIST-sized CNN through step 2 with int8 first and last layers."""
    import tsquant

    from bn_helpers import with_bn_statistics

    model = build_model("small_cnn", in_channels=1, image_size=28, width=width)
    step1 = with_bn_statistics(tsquant.prepare_step1(model), images)
    cfg = tsquant.TransformConfig(
        first_layer="int8",
        last_layer="int8",
        method=tsquant.SolverConfig(iters=iters),
        positions_per_image=8,
        verbose=False,
    )
    return tsquant.transform(step1, list(images.split(16)), cfg)
