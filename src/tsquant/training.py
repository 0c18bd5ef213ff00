"""One training loop for the train (FP), codes (step 1) and finetune stages.

Resumable: model, optimizer, RNG, epoch and batch position are checkpointed atomically at the
end of every epoch and at most every ``checkpoint_seconds`` within one, so a killed run goes on
where it stopped and ends with the same weights as an uninterrupted run (CPU).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import distributed
from .fileio import (
    load_tensor_meta,
    load_tensors,
    optimizer_from_tensors,
    optimizer_to_tensors,
    rng_from_tensors,
    rng_to_tensors,
    save_tensors,
)

EXPLODED = 100.0  # a loss above this and EXPLODED_FACTOR x the first batch's has diverged
EXPLODED_FACTOR = 50.0


class TrainingDiverged(RuntimeError):
    """The loss or the weights left the finite range; the stage stays incomplete."""


def _first_non_finite(model: nn.Module) -> str | None:
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def describe_change(old: dict, new: dict) -> str:
    """'codes.eps 0.32 -> 0.5, train.lr 0.1 -> 0.2' (at most three) between two settings."""
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    parts = [f"{k} {old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}" for k in keys[:3]]
    more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
    return ", ".join(parts) + more


def distillation_loss(logits, teacher_logits, hard_loss, weight: float, temperature: float):
    """(1 - weight) * hard_loss + weight * T^2 * KL(softmax(teacher / T) || softmax(logits / T))
    (Hinton et al. 2015; T^2 keeps the soft term's gradient scale independent of T)."""
    t = temperature
    soft = F.kl_div(
        F.log_softmax(logits / t, dim=1),
        F.log_softmax(teacher_logits / t, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return (1 - weight) * hard_loss + weight * t * t * soft


def learning_rate(step: int, total: int, peak: float, schedule: str, warmup: float) -> float:
    if schedule == "constant" or total <= 1:
        return peak
    t = step / max(total - 1, 1)
    if schedule == "cosine":
        return 0.5 * peak * (1 + math.cos(math.pi * t))
    # onecycle: linear warm-up from peak/25, cosine down to peak/1e4
    w = max(warmup, 1e-6)
    if t < w:
        return peak / 25 + (peak - peak / 25) * t / w
    u = (t - w) / max(1 - w, 1e-6)
    return peak / 1e4 + 0.5 * (peak - peak / 1e4) * (1 + math.cos(math.pi * u))


def _progress(iterable, total, desc):
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        leave=False,
        dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 30,
        disable=None,
    )


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: str = "cpu", desc: str = "eval") -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    correct = total = 0
    for x, y in _progress(loader, len(loader), desc):
        pred = model(x.to(device)).argmax(1).cpu()
        correct += int((pred == y).sum())
        total += y.numel()
    if total == 0:
        raise ValueError("the evaluation loader is empty: check the test split")
    return 100.0 * correct / total


def _param_groups(model: nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() > 1 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def train(
    model: nn.Module,
    train_loader,
    cfg,
    work_dir: Path,
    device: str = "cpu",
    desc: str = "train",
    val_loader=None,
    provenance: dict | None = None,
    teacher: nn.Module | None = None,
) -> list[dict]:
    """Train in place; resume from ``work_dir/resume.safetensors`` when present. Returns per-epoch
    logs (with ``val_top1`` after each epoch when a validation loader is given). Under torchrun
    the model is wrapped in DDP and rank 0 writes the checkpoints."""
    work_dir = Path(work_dir)
    model.to(device)
    net = distributed.wrap(model, device)
    main_rank = distributed.world().main
    optimizer = torch.optim.SGD(
        _param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.momentum > 0,
    )
    steps_per_epoch = len(train_loader)
    total_steps = cfg.epochs * steps_per_epoch
    epoch, batch, logs = 0, 0, []
    reference = None  # the stage's first batch loss: a loss far above it has exploded
    sums = {"seen": 0, "correct": 0, "loss_sum": 0.0}  # this epoch's running figures
    spent_before = 0.0  # training seconds of earlier processes (the stage was resumed)
    resume_t = work_dir / "resume.safetensors"  # one file: tensors + progress, atomically
    meta = load_tensor_meta(resume_t) if resume_t.exists() else {}
    if resume_t.exists() and "epoch" not in meta:
        print(
            f"[{desc}] {resume_t} has no progress record (older tsquant): starting over", flush=True
        )
    elif resume_t.exists() and "provenance" in meta and meta["provenance"] != provenance:
        change = describe_change(
            (meta.get("provenance") or {}).get("config", {}), (provenance or {}).get("config", {})
        )
        print(
            f"[{desc}] the resume state was written under other settings or inputs"
            f"{f' ({change})' if change else ''}: starting the stage over",
            flush=True,
        )
    elif resume_t.exists():
        tensors = load_tensors(resume_t)
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        optimizer_from_tensors(optimizer, tensors, meta["optimizer"])
        rng_from_tensors(tensors)
        epoch, batch, logs = meta["epoch"], meta["batch"], meta["logs"]
        reference = meta.get("loss_reference")
        sums = meta["sums"]
        spent_before = meta.get("spent_s", 0.0)
        print(f"[{desc}] resuming at epoch {epoch + 1} batch {batch}", flush=True)

    def checkpoint(epoch_now: int, batch_now: int, running: dict):
        if not main_rank:
            return
        bad = _first_non_finite(model)
        if bad is not None:  # never replace the last good state with a diverged one
            raise TrainingDiverged(
                f"[{desc}] training diverged before epoch {epoch_now + 1} batch {batch_now + 1} "
                f"('{bad}' holds NaN/Inf): lower the stage's learning rate (it then starts over), "
                "or run again as it is to resume from the last good checkpoint"
            )
        opt_tensors, opt_meta = optimizer_to_tensors(optimizer)
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        tensors |= opt_tensors | rng_to_tensors()
        progress = {"epoch": epoch_now, "batch": batch_now, "logs": logs, "sums": running}
        progress["provenance"] = provenance
        progress["loss_reference"] = reference
        progress["spent_s"] = spent()
        save_tensors(resume_t, tensors, {**progress, "optimizer": opt_meta})

    started = time.monotonic()

    def spent() -> float:
        return spent_before + time.monotonic() - started

    last_save = time.monotonic()
    while epoch < cfg.epochs:
        model.train()
        train_loader.set_epoch(epoch)
        seen, correct, loss_sum = sums["seen"], sums["correct"], sums["loss_sum"]
        sums = {"seen": 0, "correct": 0, "loss_sum": 0.0}
        bar = _progress(
            train_loader.iter_from(batch),
            steps_per_epoch - batch,
            f"{desc} {epoch + 1}/{cfg.epochs}",
        )
        for x, y in bar:
            step = epoch * steps_per_epoch + batch
            lr = learning_rate(step, total_steps, cfg.lr, cfg.schedule, cfg.warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = x.to(device), y.to(device)
            out = net(x)
            loss = F.cross_entropy(out, y, label_smoothing=cfg.label_smoothing)
            if teacher is not None and getattr(cfg, "distill", 0.0) > 0:
                with torch.no_grad():
                    soft = teacher(x)
                loss = distillation_loss(out, soft, loss, cfg.distill, cfg.distill_temperature)
            value = float(loss.detach())
            if reference is None:
                reference = value
            if not math.isfinite(value) or value > max(EXPLODED, EXPLODED_FACTOR * reference):
                raise TrainingDiverged(
                    f"[{desc}] training diverged at epoch {epoch + 1} batch {batch + 1} (loss "
                    f"{value:.3g}, first batch {reference:.3g}): lower the stage's learning rate "
                    "(it then starts over), or run again as it is to resume from the last good "
                    "checkpoint"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            batch += 1
            seen += y.numel()
            correct += int((out.argmax(1) == y).sum())
            loss_sum += value * y.numel()
            bar.set_postfix(
                loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}", lr=f"{lr:.3g}"
            )
            if time.monotonic() - last_save > cfg.checkpoint_seconds and batch < steps_per_epoch:
                checkpoint(epoch, batch, {"seen": seen, "correct": correct, "loss_sum": loss_sum})
                last_save = time.monotonic()
        bar.close()
        seen, correct, loss_sum = distributed.all_sum([seen, correct, loss_sum])
        log = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(seen, 1),
            "train_acc": 100 * correct / max(seen, 1),
        }
        if val_loader is not None and main_rank:
            log["val_top1"] = evaluate(model, val_loader, device, f"{desc} val")
        log["wall_s"] = round(spent(), 1)  # since the stage began, across resumes
        logs.append(log)
        print(
            f"[{desc}{'' if main_rank else f' rank {distributed.world().rank}'}] "
            f"epoch {epoch + 1}/{cfg.epochs} "
            + " ".join(
                f"{k} {v:.1f}"
                if k == "wall_s"
                else f"{k} {v:.4f}"
                if isinstance(v, float)
                else f"{k} {v}"
                for k, v in log.items()
                if k != "epoch"
            ),
            flush=True,
        )
        epoch, batch = epoch + 1, 0
        checkpoint(epoch, batch, sums)
        last_save = time.monotonic()
    return logs


def clear_resume(work_dir: Path) -> None:
    (Path(work_dir) / "resume.safetensors").unlink(missing_ok=True)
