"""Test models with the BN statistics of given images (shared by the tests; tests/ is on
sys.path through its conftest)."""

from __future__ import annotations

import torch
from torch import nn

import tsquant


def with_bn_statistics(model: nn.Module, batches, random_affine: bool = False) -> nn.Module:
    """``model`` in eval mode, each BN's running statistics the average over ``batches`` (a
    tensor, tensors or (images, labels) pairs); random_affine: affine BNs get gamma in
    U(0.5, 1.5) and beta in U(-0.3, 0.3) first (seeded), so conversions have something to keep."""
    batches = [batches] if isinstance(batches, torch.Tensor) else batches
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
            if random_affine and m.affine:
                with torch.no_grad():
                    m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                    m.bias.copy_(torch.rand(m.bias.shape, generator=gen) * 0.6 - 0.3)
    model.train()
    with torch.no_grad():
        for batch in batches:
            model(batch[0] if isinstance(batch, tuple | list) else batch)
    return model.eval()


def step1_with_statistics(model: nn.Module, batches, **prepare) -> nn.Module:
    """prepare_step1(model) with BN statistics of ``batches`` before and after the conversion."""
    model = with_bn_statistics(model, batches)
    return with_bn_statistics(tsquant.prepare_step1(model, **prepare), batches)
