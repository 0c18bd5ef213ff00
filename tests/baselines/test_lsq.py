import math

import torch
from torch import nn

from tsquant.baselines import LSQActivation, LSQConv2d, lsq_quantize, prepare_lsq
from tsquant.models import build_model


def test_forward_is_on_the_grid_and_clipped():
    v = torch.tensor([-3.0, -0.4, -0.2, 0.0, 0.26, 0.74, 5.0])
    out = lsq_quantize(v, torch.tensor(0.5), 1, 1, 1.0)
    assert out.tolist() == [-0.5, -0.5, 0.0, 0.0, 0.5, 0.5, 0.5]


def test_gradients_follow_lsq():
    # d q / d v = 1 inside the clip range, 0 outside; d q / d s = -v/s + round(v/s) inside,
    # -Q_n or Q_p outside (Esser et al. 2020, eq. 3), times the gradient scale
    v = torch.tensor([-2.0, 0.3, 0.9, 4.0], requires_grad=True)
    s = torch.tensor(1.0, requires_grad=True)
    lsq_quantize(v, s, 0, 3, 0.5).sum().backward()
    assert v.grad.tolist() == [0.0, 1.0, 1.0, 0.0]
    expected = (0.0 + (-0.3 + 0.0) + (-0.9 + 1.0) + 3.0) * 0.5
    assert abs(float(s.grad) - expected) < 1e-6


def test_prepare_lsq_keeps_first_last_and_head_input_full_precision():
    fp = build_model("small_cnn", num_classes=10, in_channels=1, image_size=28)
    qat = prepare_lsq(fp)
    convs = {n for n, m in qat.named_modules() if isinstance(m, LSQConv2d)}
    assert convs == {"conv2.conv", "conv3.conv", "conv4.conv"}
    assert type(qat.classifier) is nn.Linear and type(qat.conv1.conv) is nn.Conv2d
    acts = {n for n, m in qat.named_modules() if isinstance(m, LSQActivation)}
    assert acts == {"conv1.relu", "conv2.relu", "conv3.relu"}  # conv4.relu feeds the head
    x = torch.randn(4, 1, 28, 28)
    assert qat(x).shape == (4, 10)
    layer = qat.conv2.conv
    codes = layer.quantized_weight() / layer.step.reshape(-1, 1, 1, 1)
    assert set(torch.round(codes).unique().tolist()) <= {-1.0, 0.0, 1.0}
    torch.testing.assert_close(codes, torch.round(codes))
    assert fp.conv2.conv.weight.data_ptr() != layer.weight.data_ptr()  # the FP model is untouched


def test_activation_equals_the_composed_lsq_quantizer_and_its_gradients():
    # LSQActivation runs step 1's fused learned-step quantizer; LSQ's definition is lsq_quantize
    torch.manual_seed(0)
    act = LSQActivation(bits=2).double()
    x = (torch.randn(4, 3, 6, 6, dtype=torch.float64) * 1.5).requires_grad_()
    upstream = torch.randn_like(x)
    act(x).mul(upstream).sum().backward()  # the first batch initialises the step
    ours = (act(x).detach(), x.grad.clone(), act.step.grad.clone())

    x.grad = None
    step = act.step.detach().clone().requires_grad_()
    scale = 1 / math.sqrt(x[0].numel() * 3)
    reference = lsq_quantize(x, step, 0, 3, scale)
    reference.mul(upstream).sum().backward()
    torch.testing.assert_close(ours[0], reference.detach())
    torch.testing.assert_close(ours[1], x.grad)
    torch.testing.assert_close(ours[2], step.grad)


def test_activation_step_cannot_reach_zero():
    act = LSQActivation(bits=2)
    act(torch.rand(2, 3, 4, 4))
    with torch.no_grad():
        act.step.fill_(-0.5)  # e.g. after a bad optimizer step
    out = act(torch.rand(2, 3, 4, 4))
    assert float(act.step.detach()) == torch.tensor(LSQActivation.MIN_STEP).item() > 0
    assert torch.isfinite(out).all()
