"""benchmarks/user_models.py: the user-style models the benchmarks train."""

import torch
from torch import nn

from tsquant import prepare_step1


def test_resnet20_affine_is_the_usual_resnet20_and_quantizes(load_benchmark):
    model = load_benchmark("user_models").resnet20_affine(num_classes=10, image_size=32)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 19 and all(bn.affine for bn in bns)
    assert sum(p.numel() for p in model.parameters()) == 269_722  # He et al.'s 0.27M
    torch.manual_seed(0)
    for bn in bns:  # gamma and beta away from their init, so keeping them is visible
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.uniform_(bn.bias, -0.5, 0.5)
    step1 = prepare_step1(model, affine_bn="keep", check_export=False).eval()
    x = torch.randn(4, 3, 32, 32)
    assert step1(x).shape == (4, 10)
    kept = [m for m in step1.modules() if isinstance(m, nn.BatchNorm2d) and m.affine]
    assert len(kept) == 19
