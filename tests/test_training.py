"""The training loop's losses: distillation from the FP model's logits (step 1, fine-tune)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tsquant.training import distillation_loss


def test_distillation_loss_is_the_weighted_kl_of_softened_outputs():
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
    hard = F.cross_entropy(student, torch.arange(6) % 5)
    t = 3.0
    p = F.softmax(teacher / t, dim=1)
    kl = (p * (p.log() - F.log_softmax(student / t, dim=1))).sum(1).mean()
    loss = distillation_loss(student, teacher, hard, 0.7, t)
    assert float(loss) == pytest.approx(float(0.3 * hard + 0.7 * t * t * kl), rel=1e-5)
    assert float(distillation_loss(student, teacher, hard, 0.0, t)) == pytest.approx(float(hard))
    # a student that matches its teacher pays nothing for the soft term
    same = distillation_loss(teacher, teacher, torch.tensor(0.0), 1.0, t)
    assert math.isclose(float(same), 0.0, abs_tol=1e-6)


def test_distillation_in_the_pipeline(tmp_path, tiny_run_args, capsys):
    import json

    from tsquant.cli import main

    args = ["run", *tiny_run_args, "--set", "codes.distill=0.5", "--set", "finetune.distill=0.5"]
    assert main(args) == 0
    run = tmp_path / "runs" / "tiny"
    meta = json.loads((run / "finetune" / "meta.json").read_text())
    assert (
        meta["provenance"]["inputs"]["teacher"]
        == json.loads((run / "train" / "meta.json").read_text())["model_sha256"]
    )
    assert main(["eval", *tiny_run_args, "--set", "train.distill=0.5"]) == 2
    assert "for codes and finetune only" in capsys.readouterr().err
