import pytest
import torch
from torch import nn

brevitas = pytest.importorskip("brevitas")  # optional benchmark dependency: tsquant[bench]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

from tsquant.baselines import brevitas_gptq  # noqa: E402
from tsquant.models import build_model  # noqa: E402


def test_gptq_gives_ternary_weights_on_the_same_layers_as_tsq():
    torch.manual_seed(0)
    fp = build_model("small_cnn", num_classes=10, in_channels=1, image_size=28).eval()
    calib = [torch.randn(8, 1, 28, 28) for _ in range(2)]
    quant = brevitas_gptq(fp, calib)
    quantized = {n for n, m in quant.named_modules() if type(m).__name__ == "QuantConv2d"}
    assert quantized == {"conv2.conv", "conv3.conv", "conv4.conv"}
    assert type(quant.conv1.conv) is nn.Conv2d and type(quant.classifier) is nn.Linear
    codes = quant.conv2.conv.quant_weight().int()
    assert set(codes.unique().tolist()) <= {-1, 0, 1}
    assert quant(calib[0]).shape == (8, 10)
