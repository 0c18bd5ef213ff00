"""Pipeline stages: train -> codes -> transform -> finetune -> eval -> report.

Each stage reads the previous stage's checkpoint from the run folder and writes its own
(``<run>/<stage>/model.safetensors`` + ``meta.json``, atomically; meta.json last, so its
presence means the stage is complete). ``run_all`` runs the stages that are not complete yet.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import shutil
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import yaml

from .. import distributed
from ..data import BatchLoader, load_dataset
from ..export.graph import check_exportable
from ..fileio import (
    CheckpointError,
    load_json,
    load_model_weights,
    save_json,
    save_tensors,
    sha256_of,
)
from ..models import build_model, build_user_model, is_factory_spec
from ..normalise import normalise
from ..quantizers.activation import SparseQuantizer
from ..report import results_table, write_report
from ..surgery import analyse, apply_boundary, convert_to_step1, quantized_skeleton
from ..training import clear_resume, evaluate, train
from ..transform import TransformConfig, step2_plan, transform
from ..version import __version__
from .config import ConfigError, RunConfig, from_dict, transform_config_of
from .lock import RunLock
from .provenance import UPSTREAM, describe_change, stage_config

STAGES = ("train", "codes", "transform", "finetune", "eval", "export", "report")
CHECKPOINTED = ("train", "codes", "transform", "finetune")  # stages whose result is a model


class Context:
    """Data, loaders and model builders of one run, created lazily."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.run_dir = cfg.run_dir
        self._data = {}
        self._train_fingerprint: str | None = None
        self._user_model_checked = False
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.world, self.device = distributed.init_from_env(cfg.device)

    def dataset(self, split: str):
        """'train', 'test' or 'val' (data.val_split training images held out of 'train')."""
        if split not in self._data:
            d = self.cfg.data
            ds = load_dataset(
                d.dataset,
                "train" if split == "val" else split,
                root=d.root,
                image_size=d.image_size,
                download=d.download,
                channels=d.channels,
            )
            if d.augment_policy != "default":
                ds.policy = d.augment_policy
            if split in ("train", "val") and d.val_split:
                rest, held = ds.holdout(d.val_split)
                ds = held if split == "val" else rest
            limit = {"train": d.train_subset, "test": d.test_subset}.get(split)
            if limit is not None and limit < len(ds):
                ds = ds.subset(limit, seed=self.cfg.seed)
            ds.mean, ds.std = self._statistics(ds, split)
            if split == "test":
                ds = self._labels_as_in_training(ds)
            self._data[split] = ds
        return self._data[split]

    def _labels_as_in_training(self, test):
        """Test labels index the training split's classes, matched by name: an ImageFolder
        split that lacks a class would otherwise shift every label after it."""
        classes = self.dataset("train").classes
        if test.classes == classes:
            return test
        unknown = [c for c in test.classes if c not in classes]
        if unknown:
            raise ConfigError(
                f"the test split has class(es) {unknown[:3]} that the training split lacks: "
                "give both splits the same class folders"
            )
        missing = [c for c in classes if c not in test.classes]
        print(
            f"[data] the test split has no images of {missing[:3]}"
            f"{' and more' if len(missing) > 3 else ''}: its labels are matched to the "
            "training split's classes by name",
            flush=True,
        )
        index = np.asarray([classes.index(c) for c in test.classes], dtype=np.int64)
        return dataclasses.replace(
            test, labels=index[np.asarray(test.labels)], classes=list(classes)
        )

    def _statistics(self, ds, split: str) -> tuple:
        """Normalisation of every split: given, or measured once on the training images."""
        d = self.cfg.data
        if d.mean is not None or d.std is not None:
            if d.mean is None or d.std is None:
                raise ConfigError("data.mean and data.std go together: give both or neither")
            stats = tuple(float(v) for v in d.mean), tuple(float(v) for v in d.std)
        elif split != "train":  # test and val are normalised like the training images
            train = self.dataset("train")
            stats = train.mean, train.std
        elif d.stats == "measure":
            stats = ds.measure_stats()
        else:
            stats = ds.stats()
        if len(stats[0]) != ds.in_channels or len(stats[1]) != ds.in_channels:
            raise ConfigError(
                f"data.mean/std have {len(stats[0])}/{len(stats[1])} values but the images have "
                f"{ds.in_channels} channel(s): give one value per channel"
            )
        return stats

    def val_loader(self) -> BatchLoader | None:
        if not self.cfg.data.val_split:
            return None
        return BatchLoader(self.dataset("val"), self.cfg.data.eval_batch_size)

    def train_loader(self, cfg_train) -> BatchLoader:
        loader = self._train_loader(cfg_train)
        if len(loader) == 0:
            raise ConfigError(
                f"the training split has {len(self.dataset('train'))} images, fewer than one "
                f"batch (data.batch_size={self.cfg.data.batch_size}): lower data.batch_size"
            )
        return loader

    def _train_loader(self, cfg_train) -> BatchLoader:
        return BatchLoader(
            self.dataset("train"),
            distributed.shard_batch_size(self.cfg.data.batch_size),
            shuffle=True,
            augment=cfg_train.augment,
            seed=self.cfg.seed,
            drop_last=True,
            channels_last=self.cfg.data.channels_last,
            rank=self.world.rank,
            world_size=self.world.world_size,
        )

    def test_loader(self) -> BatchLoader:
        return BatchLoader(self.dataset("test"), self.cfg.data.eval_batch_size)

    def calib_loader(self) -> BatchLoader:
        train_ds = self.dataset("train")
        n = min(self.cfg.transform.calib_images, len(train_ds))
        return BatchLoader(
            train_ds.subset(n, seed=self.cfg.seed + 1), self.cfg.data.eval_batch_size
        )

    def fp_model(self, weights: Path | None = None) -> torch.nn.Module:
        """The FP network; ``weights`` (the user's init_checkpoint) are loaded into the model
        as the user wrote it, before normalisation folds conv biases into the BNs."""
        ds = self.dataset("test")
        h, w, c = ds.image_shape
        torch.manual_seed(self.cfg.seed)
        m = self.cfg.model
        kwargs = {k: yaml.safe_load(v) if isinstance(v, str) else v for k, v in m.kwargs.items()}
        if not is_factory_spec(m.name):
            model = build_model(
                m.name, num_classes=ds.num_classes, in_channels=c, image_size=h, **kwargs
            )
            if weights is not None:
                load_model_weights(model, weights, user_file=True)
            return model
        model = build_user_model(m.name, kwargs)
        if weights is not None:
            load_model_weights(model, weights, user_file=True)
        # normalised (state-dict keys kept, conv biases folded into the BNs): `view` after a
        # channels-last conv would fail
        model = normalise(model)
        if not self._user_model_checked:  # one forward pass: wrong classes or channels fail now
            try:
                with torch.no_grad():
                    out = copy.deepcopy(model).eval()(torch.zeros(2, c, h, w))
            except Exception as exc:
                raise ConfigError(
                    f"model.name {m.name!r} cannot run on {c}x{h}x{w} images of "
                    f"data.dataset {self.cfg.data.dataset!r} ({type(exc).__name__}: "
                    f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}): fix "
                    "model.kwargs or the data options"
                ) from None
            if tuple(out.shape) != (2, ds.num_classes):
                raise ConfigError(
                    f"model.name {m.name!r} outputs shape {tuple(out.shape[1:])} per image but "
                    f"the dataset has {ds.num_classes} classes: set model.kwargs so the model "
                    f"ends in {ds.num_classes} logits"
                )
            self._user_model_checked = True
        return model

    def step1_model(self) -> torch.nn.Module:
        c = self.cfg.codes
        return convert_to_step1(  # the export is checked once per run, in check_export_early
            self.fp_model(),
            bits=c.bits,
            eps=c.eps,
            keep_head_input_fp=c.keep_head_input_fp,
            affine_bn=c.affine_bn,
        )

    def check_export_early(self) -> None:
        """A model the export cannot write fails now, not after training and step 2."""
        if not self.cfg.export.enabled:
            return
        step1 = self.step1_model()
        check_exportable(step1, "or set export.enabled=false")
        if self.cfg.transform.first_layer == "int8" and self.cfg.export.onnx:
            first = analyse(step1)[0]
            fan_in = step1.get_submodule(first.name).weight[0].numel()
            if fan_in * 127 * 127 >= 2**24:
                raise ConfigError(
                    f"transform.first_layer=int8: {first.name} has {fan_in} inputs, too many for "
                    "the ONNX encoding of signed 8-bit inputs (exact below 1,040): keep it fp, "
                    "or set export.onnx=false"
                )

    def tsq_model(self) -> torch.nn.Module:
        if not self.done("transform"):
            raise CheckpointError(
                f"stage 'transform' has not finished in {self.run_dir}: run `tsquant transform` "
                "(or `tsquant run`) first"
            )
        meta = load_json(self.stage_dir("transform") / "meta.json")
        grids = meta.get("layer_formats") or meta["weight_bits"]
        model = quantized_skeleton(self.step1_model(), meta["quantized_layers"], grids)
        return apply_boundary(
            model, meta.get("input_quantizer", False), meta.get("head_inputs", [])
        )

    def transform_config(self, **overrides) -> TransformConfig:
        """Step-2 options of this run (config.transform_config_of) on this run's device."""
        return transform_config_of(self.cfg, **{"device": self.device, **overrides})

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / stage

    def done(self, stage: str) -> bool:
        return (self.stage_dir(stage) / "meta.json").is_file()

    def load(self, stage: str, model: torch.nn.Module) -> torch.nn.Module:
        path = self.stage_dir(stage) / "model.safetensors"
        if not self.done(stage):
            raise CheckpointError(
                f"stage '{stage}' has not finished in {self.run_dir}: "
                f"run `tsquant {stage}` (or `tsquant run`) first"
            )
        recorded = load_json(self.stage_dir(stage) / "meta.json").get("model_sha256")
        if recorded is not None and sha256_of(path) != recorded:
            raise CheckpointError(
                f"{path} does not match the sha256 its meta.json records (modified or damaged): "
                f"run `tsquant {stage}` to rebuild it"
            )
        load_model_weights(model, path)
        return model.to(self.device)

    def teacher(self) -> torch.nn.Module:
        """The FP model of the train stage, frozen, for distillation in step 1 and fine-tune."""
        model = self.load("train", self.fp_model()).eval()
        if self.cfg.data.channels_last:
            model.to(memory_format=torch.channels_last)
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    def train_fingerprint(self) -> str:
        """The training split's fingerprint, computed once per run (every stage records it)."""
        if self._train_fingerprint is None:
            self._train_fingerprint = self.dataset("train").fingerprint()
        return self._train_fingerprint

    def provenance(self, stage: str) -> dict:
        """What the stage's result depends on: its options and the hashes of its inputs."""
        inputs = {}
        upstream = UPSTREAM[stage]
        if upstream is not None:
            inputs["upstream"] = load_json(self.stage_dir(upstream) / "meta.json")["model_sha256"]
        if stage == "finetune" and self.cfg.finetune.distill > 0:  # the FP model teaches
            inputs["teacher"] = load_json(self.stage_dir("train") / "meta.json")["model_sha256"]
        if stage == "train" and self.cfg.init_checkpoint:
            inputs["init_checkpoint"] = sha256_of(Path(self.cfg.init_checkpoint))
        else:
            inputs["train_data"] = self.train_fingerprint()
        record = {"config": stage_config(self.cfg, stage), "inputs": inputs}
        return json.loads(json.dumps(record))  # as meta.json will hold it

    def stale_reason(self, stage: str) -> str | None:
        """Why a finished stage no longer holds this run's result (None: it does)."""
        meta = load_json(self.stage_dir(stage) / "meta.json")
        recorded = meta.get("provenance")
        if recorded is None:
            return "it records no provenance (made by an earlier tsquant)"
        if sha256_of(self.stage_dir(stage) / "model.safetensors") != meta.get("model_sha256"):
            return "its checkpoint does not match the sha256 in its meta.json"
        upstream = UPSTREAM[stage]
        if upstream is not None and not self.done(upstream):
            return f"the {upstream} stage it was built from is gone"
        now = self.provenance(stage)
        if now["config"] != recorded["config"]:
            return f"settings changed ({describe_change(recorded['config'], now['config'])})"
        labels = {
            "upstream": f"the {upstream} stage it was built from has changed",
            "init_checkpoint": "init_checkpoint's contents changed",
            "teacher": "the FP model it was distilled from has changed",
            "train_data": "the training data changed",
        }
        for key, label in labels.items():
            if now["inputs"].get(key) != recorded["inputs"].get(key):
                return label
        return None

    def as_recorded(self, stage: str) -> Context:
        """This context with the model, step-1 and step-2 options the stage was made with."""
        made_with = load_json(self.stage_dir(stage) / "meta.json")["config"]
        try:
            sections = {
                name: from_dict(type(getattr(self.cfg, name)), made_with[name], prefix=f"{name}.")
                for name in ("model", "codes", "transform")
            }
        except ConfigError as exc:
            raise CheckpointError(
                f"the {stage} stage in {self.run_dir} records settings this tsquant cannot read "
                f"({exc}): run `tsquant run` to rebuild it"
            ) from None
        other = copy.copy(self)
        other.cfg = dataclasses.replace(self.cfg, **sections)
        return other

    def broken_chain(self, stage: str) -> str | None:
        """Why a finished stage was not built from the checkpoints now upstream of it."""
        while UPSTREAM.get(stage) is not None:
            upstream = UPSTREAM[stage]
            recorded = load_json(self.stage_dir(stage) / "meta.json").get("provenance")
            if recorded is None:
                return f"{stage} records no provenance (made by an earlier tsquant)"
            if not self.done(upstream):
                return f"the {upstream} stage {stage} was built from is gone"
            current = load_json(self.stage_dir(upstream) / "meta.json")["model_sha256"]
            if recorded["inputs"].get("upstream") != current:
                return f"{stage} was built from an earlier {upstream} result"
            stage = upstream
        return None

    def finish(self, stage: str, model: torch.nn.Module, meta: dict) -> None:
        """Write the stage's model and meta.json (rank 0 only under torchrun)."""
        if not self.world.main:
            return
        out = self.stage_dir(stage)
        provenance = self.provenance(stage)
        save_tensors(out / "model.safetensors", model.state_dict(), {"stage": stage})
        meta = {
            "stage": stage,
            "tsquant": __version__,
            "config": asdict(self.cfg),
            "provenance": provenance,
            "model_sha256": sha256_of(out / "model.safetensors"),
            **meta,
        }
        clear_resume(out)
        save_json(out / "meta.json", meta)  # last: marks the stage complete


def _train_stage(ctx: Context, stage: str, model, cfg_train, desc: str) -> dict:
    start = time.time()
    if ctx.cfg.data.channels_last:
        model.to(memory_format=torch.channels_last)
    logs = train(
        model,
        ctx.train_loader(cfg_train),
        cfg_train,
        ctx.stage_dir(stage),
        ctx.device,
        desc=desc,
        val_loader=ctx.val_loader(),
        provenance=ctx.provenance(stage),
        teacher=ctx.teacher() if getattr(cfg_train, "distill", 0.0) > 0 else None,
    )
    trained = time.time()
    top1 = None
    if ctx.world.main:
        top1 = evaluate(model, ctx.test_loader(), ctx.device, f"{stage} eval")
        print(f"[{stage}] test top-1 {top1:.2f}%", flush=True)
    # a resumed stage's training time includes that of the processes before it
    train_s = logs[-1].get("wall_s", trained - start) if logs else trained - start
    meta = {"logs": logs, "test_top1": top1, "wall_s": train_s + time.time() - trained}
    if logs and "val_top1" in logs[-1]:
        meta["val_top1"] = logs[-1]["val_top1"]
    return meta


def stage_train(ctx: Context) -> None:
    init = Path(ctx.cfg.init_checkpoint) if ctx.cfg.init_checkpoint else None
    model = ctx.fp_model(weights=init).to(ctx.device)
    if init is not None:
        top1 = None
        if ctx.world.main:
            top1 = evaluate(model, ctx.test_loader(), ctx.device, "fp eval")
            print(f"[train] loaded {ctx.cfg.init_checkpoint}: test top-1 {top1:.2f}%", flush=True)
        meta = {
            "test_top1": top1,
            "source": ctx.cfg.init_checkpoint,
            "source_sha256": sha256_of(Path(ctx.cfg.init_checkpoint)),
        }
    else:
        meta = _train_stage(ctx, "train", model, ctx.cfg.train, "fp")
    ctx.finish("train", model, meta)


def stage_codes(ctx: Context) -> None:
    fp = ctx.load("train", ctx.fp_model())
    c = ctx.cfg.codes
    model = convert_to_step1(
        fp, c.bits, c.eps, keep_head_input_fp=c.keep_head_input_fp, affine_bn=c.affine_bn
    )
    quantizers = [m for m in model.modules() if isinstance(m, SparseQuantizer)]
    for q in quantizers if c.learn_step else ():
        q.learn_step()
    meta = _train_stage(ctx, "codes", model, c, "step1")
    for q in quantizers:
        q.freeze_step()
    if c.learn_step:
        meta["learned_steps"] = [round(q.step, 4) for q in quantizers]
    ctx.finish("codes", model, meta)


def stage_transform(ctx: Context) -> None:
    step1 = ctx.load("codes", ctx.step1_model())
    t = ctx.cfg.transform
    tcfg = ctx.transform_config()
    rows: list[dict] = []
    start = time.time()
    model = transform(step1, ctx.calib_loader(), tcfg, report=rows, memory=ctx.cfg.memory)
    wall = time.time() - start
    top1 = evaluate(model, ctx.test_loader(), ctx.device, "tsq eval")
    print(f"[transform] test top-1 {top1:.2f}% (step 2 took {wall:.1f}s)", flush=True)
    plan = step2_plan(model)
    ctx.finish(
        "transform",
        model,
        {
            "test_top1": top1,
            "wall_s": wall,
            "layers": rows,
            "quantized_layers": plan["layers"],
            "layer_formats": plan["formats"],
            "input_quantizer": plan["input_quantizer"],
            "head_inputs": plan["head_inputs"],
            "weight_bits": t.weight_bits,
        },
    )


def stage_finetune(ctx: Context) -> None:
    model = ctx.load("transform", ctx.tsq_model())
    f = ctx.cfg.finetune
    if f.epochs == 0:
        print("[finetune] finetune.epochs is 0: skipped", flush=True)
        meta = {"skipped": True, "test_top1": None}
    else:
        meta = _train_stage(ctx, "finetune", model, f, "finetune")
    ctx.finish("finetune", model, meta)


def stage_eval(ctx: Context) -> list[dict]:
    rows = []
    test, val = ctx.test_loader(), ctx.val_loader()
    ds = ctx.dataset("test")
    candidates = [
        ("fp", "train", Context.fp_model),
        ("step1", "codes", Context.step1_model),
        ("tsq", "transform", Context.tsq_model),
        ("tsq_ft", "finetune", Context.tsq_model),
    ]
    for method, stage, build in candidates:
        if not ctx.done(stage) or load_json(ctx.stage_dir(stage) / "meta.json").get("skipped"):
            continue
        broken = ctx.broken_chain(stage)
        if broken:
            print(f"[eval] {method} left out: {broken}; `tsquant run` rebuilds it", flush=True)
            continue
        made_with = load_json(ctx.stage_dir(stage) / "meta.json")["config"]  # not today's config
        start = time.time()
        model = build(ctx.as_recorded(stage))
        model = ctx.load(stage, model)
        top1 = evaluate(model, test, ctx.device, f"eval {method}")
        # the held-out training images (data.val_split): what settings are chosen on
        val_top1 = None if val is None else evaluate(model, val, ctx.device, f"val {method}")
        rows.append(
            {
                "method": method,
                "stage": stage,
                "top1": top1,
                "val_top1": val_top1,
                "test_images": len(ds),
                "dataset": ds.title or ds.name,
                "model": made_with["model"]["name"],
                "w_bits": "fp" if method in ("fp", "step1") else _weight_label(ctx),
                "a_bits": "fp" if method == "fp" else made_with["codes"]["bits"],
                "eps": made_with["codes"]["eps"] if method != "fp" else None,
                "seed": made_with["seed"],
                "eval_s": time.time() - start,
            }
        )
    if not rows:
        raise CheckpointError(f"nothing to evaluate in {ctx.run_dir}: run `tsquant run` first")
    print(results_table(rows), flush=True)
    save_json(ctx.stage_dir("eval") / "results.json", {"rows": rows})
    save_json(ctx.stage_dir("eval") / "meta.json", {"stage": "eval", "rows": rows})
    return rows


def _weight_label(ctx: Context) -> str | int:
    """The transform stage's weight format, or 'mixed' (with the formats) when layers differ."""
    meta = load_json(ctx.stage_dir("transform") / "meta.json")
    formats = meta.get("layer_formats") or {}
    kinds = sorted({str(f) for f in formats.values()})
    if len(kinds) > 1:
        return "mixed (" + ", ".join(kinds) + ")"
    return meta["weight_bits"] if not kinds else formats[next(iter(formats))]


def final_stage(ctx: Context) -> str:
    """The stage holding the quantized model to deploy: finetune unless it was skipped."""
    if ctx.done("finetune") and not load_json(ctx.stage_dir("finetune") / "meta.json").get(
        "skipped"
    ):
        return "finetune"
    return "transform"


def stage_export(ctx: Context) -> dict:
    """Integer export + ONNX + model card, verified against the fake-quant model."""
    from ..export import export_model, format_card, load_export, model_card
    from ..export.onnx_export import onnx_session, quantizer_paths, to_onnx
    from ..export.verify import verify

    if not ctx.cfg.export.enabled:
        print("[export] export.enabled is false: skipped", flush=True)
        return {}
    ctx.check_export_early()
    source = final_stage(ctx)
    model = ctx.load(source, ctx.tsq_model()).cpu().eval()
    test = ctx.dataset("test")
    h, w, c = test.image_shape
    out = ctx.stage_dir("export")
    source_path = ctx.stage_dir(source) / "model.safetensors"
    info = {
        "model": ctx.cfg.model.name,
        "dataset": test.title or test.name,
        "source": {"stage": source, "path": str(source_path), "sha256": sha256_of(source_path)},
        "num_classes": test.num_classes,
        "classes": list(test.classes),
        "preprocess": dict(
            zip(("mean", "std"), test.stats(), strict=True),
            input="NCHW float32: (pixel / 255 - mean) / std per channel",
        ),
    }
    export_model(model, out, [c, h, w], info)
    exported = load_export(out)  # what a user will load: the check runs on the file, not memory
    sample_n = min(ctx.cfg.export.card_images, len(test))
    sample = next(iter(BatchLoader(test.subset(sample_n, seed=ctx.cfg.seed), sample_n)))[0]
    card = model_card(exported, out, sample.contiguous().float())
    print(format_card(card), flush=True)
    session = qonnx = None
    if ctx.cfg.export.onnx:
        session = onnx_session(to_onnx(exported, out / "model.onnx"))
        paths = Counter(quantizer_paths(out / "model.onnx").values())
        print(
            "[export] ONNX quantizers: " + ", ".join(f"{n} {how}" for how, n in paths.most_common())
        )
    if ctx.cfg.export.qonnx:
        from ..export.qonnx_export import QONNXRunner, to_qonnx

        to_qonnx(exported, out / "model.qonnx.onnx")
        qonnx = QONNXRunner(exported)
    row = {"model": ctx.cfg.model.name, "dataset": info["dataset"], "source_stage": source}
    n = ctx.cfg.export.verify_images
    if n != 0:
        data = test if n is None or n >= len(test) else test.subset(n, seed=ctx.cfg.seed)
        row.update(
            verify(
                model,
                exported,
                BatchLoader(data, ctx.cfg.data.eval_batch_size),
                session,
                qonnx_runner=qonnx,
            )
        )
        print(
            f"[export] {row['test_images']} test images: torch {row['torch_top1']:.2f}% | "
            f"int {row['int_top1']:.2f}% | onnx {row['onnx_top1'] if session else 'n/a'} | "
            + (f"qonnx {row['qonnx_top1']:.2f}% | " if qonnx else "")
            + f"int vs torch prediction disagreements {row['int_vs_fakequant_disagreements']} "
            f"(vs float64 torch: {row['int_vs_fakequant64_disagreements']}), "
            f"code mismatches {row['code_mismatches_float32']} of {row['codes_compared']:,}",
            flush=True,
        )
    row.update({k: card[k] for k in ("size_bytes", "fp32_size_bytes", "zero_weight_fraction")})
    save_json(out / "card.json", card)
    save_json(out / "verify.json", row)
    return row


def stage_report(ctx: Context) -> Path:
    return write_report(ctx)


RUNNERS = {
    "train": stage_train,
    "codes": stage_codes,
    "transform": stage_transform,
    "finetune": stage_finetune,
    "eval": stage_eval,
    "export": stage_export,
    "report": stage_report,
}


PARALLEL = ("train", "codes", "finetune")  # stages every torchrun process takes part in


def _run_one(ctx: Context, stage: str) -> None:
    """Run a stage; under torchrun the non-training stages run on rank 0 while the others wait."""
    if stage in PARALLEL or ctx.world.main:
        RUNNERS[stage](ctx)
    distributed.barrier()  # one per stage on every rank: rank 0 has written its results


def _locked(ctx: Context):
    """The run folder's lock on rank 0 (the other ranks follow rank 0's stages)."""
    return RunLock(ctx.run_dir) if ctx.world.main else contextlib.nullcontext()


def run_stage(cfg: RunConfig, stage: str, force: bool = True) -> None:
    ctx = Context(cfg)
    if stage == "codes":
        ctx.check_export_early()
    with _locked(ctx):
        if force and stage in CHECKPOINTED and ctx.done(stage):
            distributed.barrier()  # every rank has seen the old checkpoint before it goes
            if ctx.world.main:
                shutil.rmtree(ctx.stage_dir(stage))  # re-run alone: start clean (resume too)
            distributed.barrier()
        _run_one(ctx, stage)


def run_all(cfg: RunConfig, stages: tuple[str, ...] = STAGES) -> None:
    """Run every stage (of ``stages``) that is not complete yet; an interrupted stage resumes."""
    ctx = Context(cfg)
    if "export" in stages:
        ctx.check_export_early()
    with _locked(ctx):
        for stage in stages:
            say = print if ctx.world.main else (lambda *a, **k: None)
            if stage in CHECKPOINTED and ctx.done(stage):
                reason = ctx.stale_reason(stage)
                if reason is None:
                    say(f"[run] {stage}: done, skipped", flush=True)
                    continue
                say(f"[run] {stage}: {reason}: running it again", flush=True)
                distributed.barrier()
                if ctx.world.main:
                    shutil.rmtree(ctx.stage_dir(stage))
                distributed.barrier()
            say(f"[run] {stage}", flush=True)
            _run_one(ctx, stage)
            if ctx.world.main:  # after a stage: a run that fails at once leaves no folder
                save_json(ctx.run_dir / "config.json", asdict(cfg))
