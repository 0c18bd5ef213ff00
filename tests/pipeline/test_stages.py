"""Pipeline stages on a tiny synthetic dataset (conftest.tiny_fmnist)."""

import pytest

from tsquant import SparseQuantizer
from tsquant.fileio import load_json
from tsquant.pipeline.config import load_config
from tsquant.pipeline.provenance import stage_config
from tsquant.pipeline.stages import Context, run_all
from tsquant.quantizers.activation import gaussian_optimal_step


def _tiny(tmp_path, root, **extra):
    settings = {
        "out_dir": tmp_path / "runs",
        "name": "tiny",
        "data.root": root,
        "data.batch_size": 32,
        "data.eval_batch_size": 64,
        "train.epochs": 1,
        "train.lr": 0.02,
        "codes.epochs": 1,
        "threads": 1,
        **extra,
    }
    return load_config(None, {k: str(v) for k, v in settings.items()})


def test_learned_steps_reach_the_step1_checkpoint(tmp_path, tiny_fmnist):
    cfg = _tiny(tmp_path, tiny_fmnist, **{"codes.learn_step": "true", "codes.lr": "0.05"})
    run_all(cfg, stages=("train", "codes"))
    meta = load_json(tmp_path / "runs" / "tiny" / "codes" / "meta.json")
    design = gaussian_optimal_step(2, 0.32)
    assert meta["learned_steps"] and all(s != pytest.approx(design) for s in meta["learned_steps"])
    ctx = Context(cfg)  # the step-1 model as step 2 loads it: plain quantizers, learned d
    model = ctx.load("codes", ctx.step1_model())
    loaded = [m.step for m in model.modules() if isinstance(m, SparseQuantizer)]
    assert loaded == pytest.approx(meta["learned_steps"], abs=1e-4)
    assert not [n for n, _ in model.named_parameters() if "learned_step" in n]


def test_learn_step_is_recorded_only_when_on(tmp_path, tiny_fmnist):
    """Stages made before the option existed (it off) keep their provenance; turning it on
    re-runs step 1 and what follows."""
    off = _tiny(tmp_path, tiny_fmnist)
    on = _tiny(tmp_path, tiny_fmnist, **{"codes.learn_step": "true"})
    assert "codes.learn_step" not in stage_config(off, "codes")
    assert stage_config(on, "codes")["codes.learn_step"] is True
    assert stage_config(on, "codes") != stage_config(off, "codes")
