"""Shared helpers for the ``tsquant.models`` tests.

The TSQ conventions checker is exposed as the ``check_conventions`` fixture (a
fixture rather than an importable module so it works with every pytest import
mode and does not clash with other test folders).
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)
WEIGHT_TYPES = (nn.Conv2d, nn.Linear)
POOL_TYPES = (
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)
ADD_TARGETS = (operator.add, operator.iadd, torch.add)
FUNCTIONAL_RELUS = (F.relu, F.relu_, torch.relu, torch.relu_)


def _module(node: fx.Node, mods: dict[str, nn.Module]) -> nn.Module | None:
    if isinstance(node, fx.Node) and node.op == "call_module":
        return mods[node.target]
    return None


def _is_bn_noaffine(node: object, mods: dict[str, nn.Module]) -> bool:
    m = _module(node, mods) if isinstance(node, fx.Node) else None
    return isinstance(m, BN_TYPES) and not m.affine


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in ADD_TARGETS) or (
        node.op == "call_method" and node.target in ("add", "add_")
    )


def check_tsq_conventions(model: nn.Module, classifier_name: str = "classifier") -> fx.GraphModule:
    """Trace ``model`` with ``torch.fx`` and assert the TSQ surgery conventions.

    * no functional ReLU; every ``nn.ReLU`` instance is distinct, registered once
      and called exactly once;
    * every ReLU input is a ``BatchNorm(affine=False)`` call, or an ``add`` with
      at least one such BN call as operand (residual add between BN and ReLU);
    * every BatchNorm is ``affine=False`` and its input is a Conv2d/Linear call
      with ``bias=None`` whose only user is that BN;
    * every Conv2d has ``bias=None`` and feeds exactly one BatchNorm;
    * every Linear except the classifier has ``bias=None`` and feeds one BN;
      the classifier is a Linear with bias whose output is the graph output;
    * every pooling module's input is a ReLU call (activation before pooling);
    * the first module called is a Conv2d.

    Returns the traced ``GraphModule``.
    """
    gm = fx.symbolic_trace(model)
    mods = dict(gm.named_modules())
    graph = gm.graph

    # ReLU instances: distinct objects, each registered under a single name.
    relu_objs = [m for _, m in model.named_modules(remove_duplicate=False) if type(m) is nn.ReLU]
    assert relu_objs, "model has no nn.ReLU modules"
    assert len({id(m) for m in relu_objs}) == len(relu_objs), "an nn.ReLU instance is reused"

    relu_calls: dict[str, int] = {}
    call_modules = [n for n in graph.nodes if n.op == "call_module"]
    assert call_modules, "no module calls in traced graph"
    assert isinstance(mods[call_modules[0].target], nn.Conv2d), (
        f"first layer is {type(mods[call_modules[0].target]).__name__}, expected Conv2d"
    )

    for node in graph.nodes:
        if node.op == "call_function":
            assert node.target not in FUNCTIONAL_RELUS, f"functional relu at {node.name}"
        if node.op == "call_method":
            assert node.target not in ("relu", "relu_"), f"Tensor.relu at {node.name}"
        m = _module(node, mods)
        if m is None:
            continue
        if isinstance(m, nn.ReLU):
            relu_calls[node.target] = relu_calls.get(node.target, 0) + 1
            (inp,) = node.args
            if _is_bn_noaffine(inp, mods):
                pass
            elif isinstance(inp, fx.Node) and _is_add(inp):
                ops = [a for a in inp.args if isinstance(a, fx.Node)]
                assert any(_is_bn_noaffine(a, mods) for a in ops), (
                    f"{node.target}: add input has no BatchNorm(affine=False) operand"
                )
                assert len(inp.users) == 1, f"{node.target}: residual add has several users"
            else:
                raise AssertionError(
                    f"{node.target}: ReLU input {getattr(inp, 'name', inp)!r} is neither "
                    "BatchNorm(affine=False) nor a residual add"
                )
        elif isinstance(m, BN_TYPES):
            assert not m.affine, f"{node.target}: BatchNorm must have affine=False"
            (inp,) = node.args
            wm = _module(inp, mods)
            assert isinstance(wm, WEIGHT_TYPES), f"{node.target}: BN input is not conv/linear"
            assert wm.bias is None, f"{inp.target}: conv/linear before BN must have bias=False"
            assert list(inp.users) == [node], f"{inp.target}: must feed only its BatchNorm"
            expected = nn.BatchNorm2d if isinstance(wm, nn.Conv2d) else nn.BatchNorm1d
            assert isinstance(m, expected), f"{node.target}: wrong BatchNorm dimensionality"
        elif isinstance(m, nn.Conv2d):
            assert m.bias is None, f"{node.target}: Conv2d must have bias=False"
            users = list(node.users)
            assert len(users) == 1 and isinstance(_module(users[0], mods), BN_TYPES), (
                f"{node.target}: Conv2d must be followed directly by BatchNorm"
            )
        elif isinstance(m, nn.Linear):
            if node.target == classifier_name:
                continue
            assert m.bias is None, f"{node.target}: hidden Linear must have bias=False"
            users = list(node.users)
            assert len(users) == 1 and isinstance(_module(users[0], mods), BN_TYPES), (
                f"{node.target}: hidden Linear must be followed directly by BatchNorm1d"
            )
        elif isinstance(m, POOL_TYPES):
            (inp,) = node.args[:1]
            assert isinstance(_module(inp, mods), nn.ReLU), (
                f"{node.target}: pooling input must be a ReLU (activation before pooling)"
            )

    # every ReLU module called exactly once, and every registered ReLU is used
    relu_names = {n for n, m in gm.named_modules() if type(m) is nn.ReLU}
    assert set(relu_calls) == relu_names, "some nn.ReLU modules are never called"
    reused = {k: v for k, v in relu_calls.items() if v != 1}
    assert not reused, f"ReLU modules called more than once: {reused}"

    # all BatchNorms in the model are affine=False (including uncalled ones)
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert not m.affine, f"{name}: BatchNorm must have affine=False"

    # classifier: Linear with bias, output of the graph, called once
    clf = getattr(model, classifier_name, None)
    assert isinstance(clf, nn.Linear), f"model.{classifier_name} must be an nn.Linear"
    assert clf.bias is not None, "classifier must have bias=True"
    (out_node,) = [n for n in graph.nodes if n.op == "output"]
    result = out_node.args[0]
    assert isinstance(result, fx.Node) and result.op == "call_module", "output is not a module"
    assert result.target == classifier_name, f"graph output comes from {result.target!r}"
    assert sum(1 for n in call_modules if n.target == classifier_name) == 1
    return gm


@pytest.fixture
def check_conventions():
    return check_tsq_conventions
