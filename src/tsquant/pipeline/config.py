"""Run configuration: YAML mapped onto validated dataclasses.

Every option has a default and a help text (field metadata "help"); the CLI lists them and
accepts them as ``--section.key VALUE`` overrides. Unknown keys are rejected with the nearest
valid name suggested.
"""

from __future__ import annotations

import difflib
import math
import tempfile
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Literal

import yaml

from ..baselines.adaround import AdaRoundConfig
from ..options import literal_choices, type_hints, union_members
from ..options import option as opt
from ..solver import SolverConfig
from ..surgery import BoundaryPolicy
from ..transform import MemoryConfig, TransformConfig

Schedule = Literal["onecycle", "cosine", "constant"]


class ConfigError(ValueError):
    """A configuration problem; the message names the key and how to fix it."""


@dataclass
class DataConfig:
    dataset: str = opt(
        "fashion_mnist", "dataset name: fashion_mnist, mnist, cifar10, imagefolder, imagenette"
    )
    root: str | None = opt(
        None, "dataset directory or tarball (default: the dataset's standard place)"
    )
    image_size: int | None = opt(None, "input size for ImageFolder data (default: the dataset's)")
    batch_size: int = opt(128, "training batch size")
    eval_batch_size: int = opt(500, "evaluation batch size")
    download: bool = opt(False, "download the dataset when it is not found (needs a network)")
    channels_last: bool = opt(
        True, "channels-last memory format for training (faster convs on CPU)"
    )
    train_subset: int | None = opt(None, "use only this many training images (quick runs)")
    test_subset: int | None = opt(None, "evaluate on only this many test images (quick runs)")
    channels: int | None = opt(None, "ImageFolder images: 1 (read as gray) or 3 (RGB); default 3")
    augment_policy: Literal["default", "none", "crop", "crop_flip"] = opt(
        "default",
        "training augmentation: default (the dataset's; gray ImageFolders: crop), none, crop "
        "(padded random crop) or crop_flip (+ horizontal flips)",
    )
    stats: Literal["default", "measure"] = opt(
        "default",
        "normalisation statistics: default (the dataset's; ImageNet's for RGB ImageFolders) or "
        "measure (per-channel mean/std of the training images, used for every split)",
    )
    mean: list | None = opt(None, "per-channel mean in [0, 1] (overrides data.stats)")
    std: list | None = opt(None, "per-channel std in [0, 1] (overrides data.stats)")
    val_split: int = opt(
        0,
        "hold out this many training images (stratified, the same for every seed) as a "
        "validation split for choosing settings; stages then report val top-1 (0: none)",
    )


@dataclass
class ModelConfig:
    name: str = opt(
        "small_cnn",
        "architecture: small_cnn, resnet20/32/56, vgg_small, alexnet_bn, resnet18, or your own "
        "model as package.module:factory",
    )
    kwargs: dict = opt({}, "keyword arguments of the model (built-in or package.module:factory)")


@dataclass
class TrainConfig:
    epochs: int = opt(6, "epochs")
    lr: float = opt(0.1, "peak learning rate (SGD with Nesterov momentum)")
    momentum: float = opt(0.9, "SGD momentum")
    weight_decay: float = opt(5e-4, "weight decay")
    schedule: Schedule = opt("onecycle", "learning-rate schedule: onecycle, cosine or constant")
    warmup: float = opt(0.15, "fraction of the steps spent warming up (onecycle)")
    label_smoothing: float = opt(0.0, "label smoothing of the cross-entropy loss")
    augment: bool = opt(True, "standard augmentation (random crop, flip where the dataset uses it)")
    checkpoint_seconds: float = opt(120.0, "also checkpoint mid-epoch at most this often (seconds)")
    distill: float = opt(
        0.0,
        "step 1 and fine-tune: weight of distillation from the FP model's logits (KL of "
        "softened outputs) against the labels' cross-entropy; 0 is the paper's plain loss",
    )
    distill_temperature: float = opt(4.0, "softening temperature of the distillation targets")


@dataclass
class CodesConfig(TrainConfig):
    """Step 1: FP weights, sparse 2-bit activations, trained from the FP checkpoint."""

    bits: int = opt(2, "activation bits")
    eps: float = opt(0.32, "sparsity threshold eps (fraction of zeros = Phi(eps))")
    keep_head_input_fp: bool = opt(
        True, "keep a FP ReLU on the last layer's input (released AlexNet)"
    )
    learn_step: bool = opt(
        False,
        "beyond the paper: learn each quantizer's step d in step 1 (LSQ's step gradient; eps "
        "and so the sparsity stay); false keeps the paper's Gaussian-optimal d",
    )
    affine_bn: Literal["fold", "keep"] = opt(
        "fold",
        "affine BNs of the FP model: fold (the paper's non-affine BN; beta and |gamma| dropped "
        "for step 1 to re-learn) or keep (gamma and beta stay; the converted model starts "
        "from the FP pre-activations)",
    )


@dataclass
class TransformStageConfig:
    """Step 2: the fields of tsquant.TransformConfig, with one options section per method."""

    weight_bits: str | int = opt(
        "ternary", "weight format: ternary, 2..8 (mid-rise k-bit) or narrow:k"
    )
    layer_formats: dict = opt(
        {},
        "per-layer weight formats, {layer-name pattern: format} (fnmatch, first match wins), "
        "e.g. {'layer3.*': 2}; other layers use weight_bits",
    )
    method: Literal["tsq", "otwa", "adaround"] = opt(
        "tsq",
        "tsq (the step-2 solver, options in transform.tsq), otwa (the step-1 weights quantized "
        "directly, no data: baseline) or adaround (learned rounding of the same layer problem, "
        "options in transform.adaround: baseline)",
    )
    tsq: SolverConfig = field(
        default_factory=SolverConfig, metadata={"help": "options of method tsq (the solver)"}
    )
    adaround: AdaRoundConfig = field(
        default_factory=AdaRoundConfig, metadata={"help": "options of method adaround"}
    )
    mode: Literal["sequential", "parallel"] = opt(
        "sequential", "inputs from the quantized network (sequential) or step-1 codes (parallel)"
    )
    weight_budget: float | None = opt(
        None,
        "mixed precision: average bits per quantized weight (log2 of the levels: ternary "
        "1.585, 2-bit 2.0); layers get weight_bits or budget_format where a measured step-2 "
        "pass says it gains most per bit",
    )
    budget_format: str | int = opt(2, "the richer weight format weight_budget buys")
    calib_images: int = opt(2000, "calibration images (drawn from the training set)")
    positions_per_image: int = opt(64, "sampled output positions per image for conv layers")
    first_layer: BoundaryPolicy = opt(
        "fp",
        "first layer: fp (the paper), quantize (weight_bits) or int8 (8-bit weights per "
        "channel and the input quantized to signed 8 bits: integer from the input scaling on)",
    )
    last_layer: BoundaryPolicy = opt(
        "fp",
        "last layer: fp (the paper), quantize (weight_bits) or int8 (8-bit weights per channel "
        "and its input quantized to unsigned 8 bits: integer up to the logits' scale)",
    )


@dataclass
class FinetuneConfig(TrainConfig):
    # measured on the Fashion-MNIST demo model (TSQ 90.72 %): 1 epoch at a constant 0.0005 gives
    # 91.14 % (a one-cycle 0.002 epoch gave 89.52 % with the earlier estimator)
    epochs: int = opt(1, "fine-tune epochs after step 2 (0 skips the stage)")
    lr: float = opt(0.0005, "learning rate of the fine-tune")
    schedule: Schedule = opt("constant", "learning-rate schedule: onecycle, cosine or constant")
    weight_decay: float = opt(0.0, "weight decay (latent weights)")


@dataclass
class ExportConfig:
    enabled: bool = opt(
        True,
        "write the integer export (checked before any training); false skips the export stage, "
        "for models with operations the export lacks",
    )
    onnx: bool = opt(
        True, "also write model.onnx (integer codes x weight codes, exact; integer thresholds)"
    )
    qonnx: bool = opt(
        False,
        "also write model.qonnx.onnx for FINN (Quant / MultiThreshold at the true bit widths), "
        "checked by qonnx's executor against the integer runtime (pip install 'tsquant[qonnx]')",
    )
    verify_images: int | None = opt(
        None, "test images for the int/ONNX vs PyTorch check (default: all; 0 skips it)"
    )
    card_images: int = opt(256, "test images on which the model card measures activation zeros")


@dataclass
class RunConfig:
    name: str = opt("run", "run name (the folder under out_dir)")
    out_dir: str = opt("runs", "where run folders are written")
    seed: int = opt(0, "random seed")
    device: str = opt("cpu", "cpu or cuda")
    threads: int | None = opt(None, "torch CPU threads (default: torch's choice)")
    init_checkpoint: str | None = opt(
        None, "FP checkpoint (safetensors) to start from instead of training"
    )
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "data options"})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "model options"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "FP training"})
    codes: CodesConfig = field(
        default_factory=lambda: CodesConfig(epochs=3, lr=0.01),
        metadata={"help": "step 1 training"},
    )
    transform: TransformStageConfig = field(
        default_factory=TransformStageConfig, metadata={"help": "step 2"}
    )
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig, metadata={"help": "fine-tune"})
    memory: MemoryConfig = field(
        default_factory=MemoryConfig,
        metadata={"help": "step 2's speed/memory trade (results do not depend on it)"},
    )
    export: ExportConfig = field(
        default_factory=ExportConfig, metadata={"help": "export and verification"}
    )

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


def _suggest(key: str, valid: list[str]) -> str:
    """The nearest valid name: the same option in another section first (options that moved,
    e.g. transform.lam -> transform.tsq.lam), else the closest spelling."""
    leaf = key.rsplit(".", 1)[-1]
    everywhere = [name for name, _, _ in option_table()]
    moved = [name for name in everywhere if name.rsplit(".", 1)[-1] == leaf]
    moved.sort(key=lambda name: not name.startswith(key.rsplit(".", 1)[0] + "."))
    near = moved[:1] or difflib.get_close_matches(key, valid + everywhere, n=1, cutoff=0.5)
    return f" (did you mean '{near[0]}'?)" if near else f" (valid: {', '.join(valid)})"


def _coerce(value, hint, where: str):
    choices = literal_choices(hint)
    if choices is not None and value is not None:
        optional = type(None) in union_members(hint)
        if optional and isinstance(value, str) and value.lower() in ("none", "null"):
            return None
        if value not in choices:
            listed = ", ".join(str(c) for c in choices)
            raise ConfigError(f"{where}={value!r} is not a choice: use {listed}")
        return value
    allowed = union_members(hint)
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"{where} must not be empty: give a value or remove the key")
    if isinstance(value, str):  # CLI strings and YAML quoted values
        if list in allowed or dict in allowed:  # --set data.mean=[0.5]
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError:
                parsed = None
            if isinstance(parsed, list | dict) and type(parsed) in allowed:
                return parsed
        for t in allowed:
            if t is bool and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            if t in (int, float):
                try:
                    return t(value)
                except ValueError:
                    continue
        if value.lower() in ("none", "null") and type(None) in allowed:
            return None
        if str in allowed:
            return value
    for t in allowed:
        if t is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if (
            t is not type(None)
            and isinstance(value, t)
            and not (t is int and isinstance(value, bool))
        ):
            return value
    names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise ConfigError(f"{where} must be {names}, got {value!r}")


def from_dict(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping of keys to values")
    valid = {f.name: f for f in fields(cls)}
    hints = type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in valid:
            full = [f"{prefix}{name}" for name in valid]
            raise ConfigError(f"unknown config key '{where}'{_suggest(where, full)}")
        f = valid[key]
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if is_dataclass(default):
            if value is not None and not isinstance(value, dict):
                example = next(iter(asdict(default)))
                raise ConfigError(
                    f"config key '{where}' is a section of options, got {value!r}: write it as "
                    f"'{where}:' with indented keys below (e.g. {where}.{example}), or use "
                    f"--set {where}.{example}=VALUE"
                )
            merged = {**asdict(default), **(value or {})}  # `data:` left empty: the defaults
            kwargs[key] = from_dict(type(default), merged, prefix=f"{where}.")
        else:
            kwargs[key] = _coerce(value, hints[key], where)
    try:
        config = cls(**kwargs)
    except ValueError as exc:  # the checks of the library's own config classes
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {exc}") from None
    validate(config, prefix)
    return config


def _known_names(kind: str) -> list[str]:
    if kind == "datasets":
        from ..data import DATASETS

        return list(DATASETS)
    from ..models import model_names

    return list(model_names())


def validate(config, prefix: str = "") -> None:
    """Range checks beyond types."""
    checks = {
        "bits": lambda v: isinstance(v, int) and 1 <= v <= 8,
        "eps": lambda v: math.isfinite(v) and v >= 0,
        "epochs": lambda v: v >= 0,
        "lr": lambda v: math.isfinite(v) and v > 0,
        "batch_size": lambda v: v >= 1,
        "calib_images": lambda v: v >= 1,
        "verify_images": lambda v: v >= 0,
        "card_images": lambda v: v >= 1,
        "positions_per_image": lambda v: v >= 1,
        "device": _device_ok,
        "distill": lambda v: math.isfinite(v) and 0 <= v <= 1,
        "distill_temperature": lambda v: math.isfinite(v) and v > 0,
        "eval_batch_size": lambda v: v >= 1,
        "threads": lambda v: v >= 1,
        "seed": lambda v: 0 <= v < 2**63,
        "momentum": lambda v: math.isfinite(v) and 0 <= v < 1,
        "label_smoothing": lambda v: math.isfinite(v) and 0 <= v < 1,
        "weight_decay": lambda v: math.isfinite(v) and v >= 0,
        "warmup": lambda v: math.isfinite(v) and 0 <= v < 1,
        "checkpoint_seconds": lambda v: math.isfinite(v) and v >= 0,
        "train_subset": lambda v: v >= 1,
        "test_subset": lambda v: v >= 1,
        "image_size": lambda v: v >= 1,
        "name": lambda v: isinstance(v, str) and bool(v.strip()),
        "channels": lambda v: v in (1, 3),
        "mean": lambda v: len(v) in (1, 3) and all(isinstance(x, int | float) for x in v),
        "std": lambda v: len(v) in (1, 3) and all(isinstance(x, int | float) and x > 0 for x in v),
        "val_split": lambda v: v >= 0,
    }
    hints = {
        "bits": "use 1..8",
        "eps": "use eps >= 0, e.g. 0.32",
        "distill": "use a weight in [0, 1] (0: labels only, 1: FP logits only)",
        "distill_temperature": "use a temperature > 0, e.g. 4",
        "eval_batch_size": "use a batch size >= 1",
        "threads": "use a number of threads >= 1, or leave it unset",
        "seed": "use an integer in 0..2**63-1",
        "momentum": "use 0 <= momentum < 1, e.g. 0.9",
        "label_smoothing": "use 0 <= label_smoothing < 1, e.g. 0.1",
        "weight_decay": "use weight_decay >= 0, e.g. 5e-4",
        "warmup": "use a fraction 0 <= warmup < 1 of the steps, e.g. 0.15",
        "checkpoint_seconds": "use a number of seconds >= 0 (0: after every batch)",
        "train_subset": "use a number of images >= 1, or leave it unset",
        "test_subset": "use a number of images >= 1, or leave it unset",
        "image_size": "use a size in pixels >= 1",
        "device": "use cpu, or cuda / cuda:N on a machine whose PyTorch sees a GPU",
        "name": "give a non-empty name",
        "channels": "use 1 (gray) or 3 (RGB)",
        "mean": "give one number per channel, e.g. [0.5] or [0.49, 0.48, 0.45]",
        "std": "give one positive number per channel, e.g. [0.25]",
        "val_split": "use 0 (none) or a number of training images to hold out",
    }
    for f in fields(config):
        value = getattr(config, f.name)
        if f.name in checks and value is not None and not checks[f.name](value):
            hint = hints.get(f.name, "see `tsquant --help`")
            raise ConfigError(f"{prefix}{f.name}={value!r} is out of range: {hint}")
    for attr, known in (("dataset", "datasets"), ("name", "models")):
        if isinstance(config, ModelConfig) and attr == "name" and ":" in config.name:
            continue  # a user's factory: imported and checked when the model is built
        if isinstance(config, DataConfig | ModelConfig) and hasattr(config, attr):
            valid = _known_names(known)
            value = getattr(config, attr)
            if value not in valid:
                raise ConfigError(f"unknown {prefix}{attr} '{value}'{_suggest(value, valid)}")
    if isinstance(config, RunConfig):
        _validate_run(config)
    if hasattr(config, "weight_bits"):
        from ..quantizers.weight import WeightGrid

        specs = {"weight_bits": config.weight_bits}
        specs |= {
            f"layer_formats[{k!r}]": v for k, v in getattr(config, "layer_formats", {}).items()
        }
        for where, spec in specs.items():
            try:
                WeightGrid.from_spec(yaml.safe_load(spec) if isinstance(spec, str) else spec)
            except ValueError as exc:
                raise ConfigError(f"{prefix}{where}: {exc}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML SafeLoader that refuses a key given twice in one mapping (YAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(
                    f"key '{key}' appears twice in one section (line {key_node.start_mark.line + 1}): "
                    "keep one of them"
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _device_ok(value: str) -> bool:
    import re

    import torch

    if value == "cpu":
        return True
    match = re.fullmatch(r"cuda(?::(\d+))?", value)
    if not match or not torch.cuda.is_available():
        return False
    return match.group(1) is None or int(match.group(1)) < torch.cuda.device_count()


_RUN_NAME = "letters, digits, '.', '_' and '-' (it becomes one folder under out_dir)"


def _validate_run(cfg: RunConfig) -> None:
    """Checks across fields and of the run's folder, before any work."""
    import re

    if not re.fullmatch(r"[A-Za-z0-9._-]+", cfg.name) or cfg.name in (".", ".."):
        raise ConfigError(f"name={cfg.name!r} is not a folder name: use {_RUN_NAME}")
    d = cfg.data
    for section in ("train", "codes", "finetune"):
        epochs = getattr(cfg, section).epochs
        if d.train_subset is not None and epochs and d.train_subset < d.batch_size:
            raise ConfigError(
                f"data.train_subset={d.train_subset} is smaller than one batch "
                f"(data.batch_size={d.batch_size}), so {section} would take no step: raise "
                "data.train_subset or lower data.batch_size"
            )
    t = cfg.transform
    if t.tsq.weight_bits != SolverConfig().weight_bits:
        raise ConfigError(
            "transform.tsq.weight_bits: the weight format is transform.weight_bits (and "
            "transform.layer_formats per layer): set it there"
        )
    for method in method_sections(t):  # options of a method that does not run
        section = getattr(t, method)
        changed = [f.name for f in fields(section) if getattr(section, f.name) != f.default]
        if t.method != method and changed:
            raise ConfigError(
                f"transform.{method}.{changed[0]} is set but transform.method is {t.method}: "
                f"remove it, or set transform.method: {method}"
            )
    try:  # the step-2 options, checked by the library's own TransformConfig
        transform_config_of(cfg)
    except ValueError as exc:
        raise ConfigError(f"transform: {exc}") from None
    if cfg.export.enabled and cfg.export.qonnx:
        import importlib.util

        if importlib.util.find_spec("qonnx") is None:
            raise ConfigError(
                "export.qonnx needs the qonnx package: pip install 'tsquant[qonnx]', or set "
                "export.qonnx: false"
            )
    if cfg.train.distill:
        raise ConfigError(
            "train.distill distils from the FP model, which the train stage is making: set it "
            "for codes and finetune only"
        )
    if cfg.init_checkpoint is not None and not Path(cfg.init_checkpoint).is_file():
        raise ConfigError(f"init_checkpoint {cfg.init_checkpoint} not found: check the path")
    if (d.mean is None) != (d.std is None):
        raise ConfigError("data.mean and data.std go together: give both or neither")
    out = Path(cfg.out_dir)
    for folder in (out, *out.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ConfigError(
                    f"out_dir={cfg.out_dir!r}: {folder} is a file, not a folder: choose another "
                    "out_dir"
                )
            try:  # a real probe: permissions, read-only mounts and root alike
                tempfile.TemporaryDirectory(dir=folder, prefix=".tsquant-probe-").cleanup()
            except OSError as exc:
                raise ConfigError(
                    f"out_dir={cfg.out_dir!r}: cannot write in {folder} ({exc.strerror}): "
                    "choose an out_dir you can write to"
                ) from None
            break


def method_sections(section: TransformStageConfig) -> list[str]:
    """The transform section's per-method option sections (tsq, adaround)."""
    return [f.name for f in fields(section) if is_dataclass(getattr(section, f.name))]


def transform_config_of(cfg: RunConfig, **overrides) -> TransformConfig:
    """The run's step-2 options as the library's TransformConfig: the transform section's
    fields by name, the method with its options section (otwa has none), the run's seed."""
    section = cfg.transform
    options = {f.name: getattr(section, f.name) for f in fields(section)}
    options["method"] = options.get(section.method, section.method)
    library = {f.name for f in fields(TransformConfig)}
    options = {k: v for k, v in options.items() if k in library}
    return TransformConfig(**{**options, "seed": cfg.seed, **overrides})


def load_config(path: str | Path | None, overrides: dict[str, str] | None = None) -> RunConfig:
    """Read YAML (or start from the defaults), apply dotted overrides, validate."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"config file {path} not found: give the path of a YAML file (see configs/)"
            )
        try:
            data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 (safe)
            data = {} if data is None else data
        except yaml.YAMLError as exc:
            raise ConfigError(
                f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}"
            ) from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} holds a {type(data).__name__}, not sections of options: "
            "see configs/ for the layout"
        )
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if node is None:
                node = data[p] = {}
            if not isinstance(node, dict):
                raise ConfigError(f"cannot set {dotted}: {p} is not a section")
        node[leaf] = value
    return from_dict(RunConfig, data)


def option_table(config=None, prefix: str = "") -> list[tuple[str, object, str]]:
    """(dotted name, default, help) for every option, nested sections included, for --help."""
    config = config or RunConfig()
    rows = []
    for f in fields(config):
        value = getattr(config, f.name)
        if is_dataclass(value):
            rows += option_table(value, f"{prefix}{f.name}.")
        else:
            rows.append((f"{prefix}{f.name}", value, f.metadata.get("help", "")))
    return rows
