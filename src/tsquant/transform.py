"""Step-2 driver over a whole model (TSQ-METHOD.md, "Step 2" and the [choice] list).

Layer by layer in topological order: capture the layer's inputs (sequential: from the model whose
earlier layers are already quantized; parallel: from the step-1 model) and its step-1 targets at
the same sampled positions, solve, write the low-bit layer back. Only one layer's data is held
at a time; forward passes stop as soon as the layer's tensors are captured.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import nn
from tqdm import tqdm

from .baselines.adaround import AdaRoundConfig, adaround_layer
from .calibration import draw_calibration
from .capture import Capture, capture_layer_inputs, capture_targets
from .options import check_choices, option
from .quantizers.activation import SparseQuantizer
from .quantizers.modules import InputQuantizer
from .quantizers.weight import WeightGrid, quantize_to_grid
from .solver.alternation import LayerSolution, SolverConfig, solve_layer, solve_linear_layer
from .solver.rows import (
    RowStore,
    mmap_threshold,
    peak_rss_mb,
    release_freed_memory,
)
from .surgery import (
    INT8,
    BoundaryPolicy,
    Layer,
    add_input_quantizer,
    analyse,
    bn_affine,
    check_finite,
    get_record,
    head_input_activations,
    quantizable_layers,
    set_module,
    set_record,
    write_back,
)


@dataclass(frozen=True)
class OTWAConfig:
    """Method ``otwa``: each layer's BN-folded step-1 weights quantized per channel (OTWA for
    ternary), no data: the HWGQ-style baseline without step 2. It has no options."""


@dataclass
class MemoryConfig:
    """How step 2 trades speed for memory; results do not depend on it."""

    cache_mb: int = option(
        128, "MB per layer of decoded rows and bin bounds kept for the solver's passes"
    )
    mmap_threshold_mb: int = option(
        0,
        "allocations of this many MB or more go back to the OS when freed (glibc; 0: the "
        "allocator is left alone): less peak memory, slower step 2; restored afterwards",
    )

    def __post_init__(self):
        for name in ("cache_mb", "mmap_threshold_mb"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


@dataclass
class TransformConfig:
    """Options of step 2 over a model; every field has a default (see README, "Step 2").

    ``method`` is the step-2 method with its options, as a config object (SolverConfig: tsq,
    AdaRoundConfig: adaround, OTWAConfig: otwa, or the config class of a method added with
    :func:`register_step2_method`), or a method's name for its default options; after
    construction it is always the config object."""

    weight_bits: str | int = "ternary"  # every quantized layer's format, unless layer_formats
    # per-layer weight formats: {layer-name pattern (fnmatch): format}, the first matching
    # pattern wins; or a function layer name -> format (None: weight_bits). torchao's
    # filter_fn / per-module config, for mixed precision
    layer_formats: dict | Callable[[str], str | int | None] | None = None
    # mixed precision under a size budget: the average bits per quantized weight (log2 of the
    # grid's levels: ternary 1.585, 2-bit 2.0). Layers get weight_bits or budget_format, the
    # richer one where a measured step-2 pass says it gains most per added bit (see
    # choose_formats); None: every layer weight_bits (or layer_formats)
    weight_budget: float | None = None
    budget_format: str | int = 2
    method: Any = "tsq"
    mode: Literal["sequential", "parallel"] = "sequential"  # parallel: inputs are step-1 codes
    calib_images: int | None = None  # calibration images drawn from the loader (None: all)
    positions_per_image: int = 64  # sampled output positions per image for conv layers
    input_key: str | None = None  # dict batches: the images' key (None: tsquant.calibration)
    first_layer: BoundaryPolicy = "fp"
    last_layer: BoundaryPolicy = "fp"
    seed: int = 0
    device: str = "cpu"
    verbose: bool = True

    def __post_init__(self):
        check_choices(self)
        self.method = step2_method(self.method).options_of(self.method)
        if self.calib_images is not None and (
            not isinstance(self.calib_images, int) or self.calib_images < 1
        ):
            raise ValueError(
                f"calib_images must be None or an integer >= 1, got {self.calib_images!r}"
            )
        if not isinstance(self.positions_per_image, int) or self.positions_per_image < 1:
            raise ValueError(
                f"positions_per_image must be an integer >= 1, got {self.positions_per_image!r}"
            )
        WeightGrid.from_spec(self.weight_bits)
        if isinstance(self.layer_formats, dict):
            for pattern, spec in self.layer_formats.items():
                try:
                    WeightGrid.from_spec(spec)
                except ValueError as exc:
                    raise ValueError(f"layer_formats[{pattern!r}]: {exc}") from None
        elif self.layer_formats is not None and not callable(self.layer_formats):
            raise ValueError(
                "layer_formats must be a dict {layer-name pattern: format} or a function of the "
                f"layer name, got {type(self.layer_formats).__name__}"
            )
        if self.weight_budget is not None:
            low = WeightGrid.from_spec(self.weight_bits).information_bits
            high = WeightGrid.from_spec(self.budget_format).information_bits
            if self.layer_formats:
                raise ValueError(
                    "weight_budget chooses the layers' formats itself: give weight_budget or "
                    "layer_formats, not both"
                )
            if not (isinstance(self.weight_budget, int | float) and low <= self.weight_budget):
                raise ValueError(
                    f"weight_budget={self.weight_budget!r} is below {self.weight_bits}'s "
                    f"{low:.3f} bits per weight: use a budget between {low:.3f} and {high:.3f}"
                )
            if not step2_method(self.method).needs_data:
                raise ValueError(
                    "weight_budget measures each layer's gain with step 2; method "
                    f"{self.method_name} solves without data: use method tsq"
                )
            if high <= low:
                raise ValueError(
                    f"budget_format={self.budget_format!r} has no more levels than "
                    f"weight_bits={self.weight_bits!r}: pick a richer format, e.g. 2 or 3"
                )
        solver_bits = getattr(self.method, "weight_bits", None)
        if solver_bits is not None and WeightGrid.from_spec(solver_bits) not in (
            WeightGrid.from_spec(self.weight_bits),
            WeightGrid.from_spec(SolverConfig().weight_bits),
        ):
            raise ValueError(
                f"weight_bits={self.weight_bits!r} but the method's weight_bits={solver_bits!r}: "
                "give the format once, as TransformConfig(weight_bits=...) (layer_formats for "
                "single layers)"
            )

    @property
    def method_name(self) -> str:
        return step2_method(self.method).name


def _target_kind(step1: nn.Module, layer: Layer) -> str:
    activation = step1.get_submodule(layer.activation) if layer.activation else None
    if layer.kind == "coded" and isinstance(activation, SparseQuantizer):
        return "codes"
    return "pre" if layer.bn else "out"


def layer_format(cfg: TransformConfig, name: str) -> str | int:
    """The weight format of layer ``name``: its layer_formats entry, else weight_bits."""
    chosen = None
    if callable(cfg.layer_formats):
        chosen = cfg.layer_formats(name)
    elif cfg.layer_formats:
        chosen = next(
            (
                spec
                for pattern, spec in cfg.layer_formats.items()
                if fnmatch.fnmatchcase(name, pattern)
            ),
            None,
        )
    return cfg.weight_bits if chosen is None else chosen


def _boundary_format(cfg: TransformConfig, layer: Layer) -> str | int:
    if (layer.first and cfg.first_layer == "int8") or (layer.last and cfg.last_layer == "int8"):
        return INT8
    return layer_format(cfg, layer.name)


def _int8_boundary(quantized: nn.Module, step1: nn.Module, calibration, cfg) -> dict:
    """Make the int8 boundary of ``quantized`` (TSQ-METHOD.md keeps these layers FP; deployed
    integer-only models keep them at 8 bits): the input quantized to signed 8 bits before an
    int8 first layer, the FP head input to unsigned 8 bits before an int8 last layer, with
    scales from the calibration data. Returns {"model", "input_quantizer", "head_inputs"}."""
    done = {"model": quantized, "input_quantizer": False, "head_inputs": []}
    if cfg.last_layer == "int8":
        for name in head_input_activations(step1):
            if not isinstance(step1.get_submodule(name), nn.ReLU):
                continue  # already a step-1 quantizer
            cap = Capture(step1, {"x": (name, "input")})
            try:
                with torch.no_grad():
                    samples = torch.cat([cap.run(x)["x"].flatten() for x in calibration])
            finally:
                cap.close()
            quantizer = SparseQuantizer.from_data(samples, bits=8, eps=0.0)
            set_module(done["model"], name, quantizer.to(samples.device))
            done["head_inputs"].append(name)
    if cfg.first_layer == "int8":
        max_abs = max(float(x.abs().max()) for x in calibration)
        done["model"] = add_input_quantizer(done["model"], InputQuantizer.from_data(max_abs))
        done["input_quantizer"] = True
    return done


@dataclass
class LayerTask:
    """One layer's step-2 problem as a method sees it (TSQ-METHOD.md, "Step 2").

    ``X``, ``Y`` and ``offset`` are None for a method that needs no data (otwa). ``quantizer`` is
    the step-1 quantizer after the layer (None: a linear target, the BN output or the logits);
    ``init`` the step-1 weights with the BN scale folded in, (c, n); ``bias`` the BN shift."""

    layer: Layer
    init: torch.Tensor
    bias: torch.Tensor
    weight_bits: str | int  # the layer's format (layer_formats, else weight_bits)
    grid: WeightGrid
    config: TransformConfig
    quantizer: SparseQuantizer | None = None
    X: RowStore | None = None
    Y: RowStore | None = None
    offset: RowStore | None = None


@dataclass(frozen=True)
class Step2Method:
    name: str
    options: type  # the method's config class: one per method, its fields the method's options
    solve: Callable[[LayerTask], LayerSolution]
    needs_data: bool = True

    def options_of(self, method) -> object:
        """The method's config object: ``method`` itself, or the defaults for its name."""
        return self.options() if isinstance(method, str) else method


STEP2_METHODS: dict[str, Step2Method] = {}


def register_step2_method(name: str, options: type, needs_data: bool = True):
    """Decorator: ``solve(task: LayerTask) -> LayerSolution`` becomes the step-2 method
    ``name``, chosen by ``TransformConfig(method=name)`` or ``method=options(...)``; the solver
    reads its options as ``task.config.method``."""

    def register(solve):
        taken = next((m.name for m in STEP2_METHODS.values() if m.options is options), None)
        if taken not in (None, name):
            raise ValueError(f"{options.__name__} already configures method {taken!r}")
        STEP2_METHODS[name] = Step2Method(name, options, solve, needs_data)
        return solve

    return register


def step2_method(method) -> Step2Method:
    """The registered method of a name or of a config object (looked up by its type)."""
    if isinstance(method, str):
        if method not in STEP2_METHODS:
            raise ValueError(f"method must be one of {', '.join(STEP2_METHODS)}, got {method!r}")
        return STEP2_METHODS[method]
    for entry in STEP2_METHODS.values():
        if type(method) is entry.options:
            return entry
    known = ", ".join(f"{m.options.__name__} ({m.name})" for m in STEP2_METHODS.values())
    raise ValueError(f"method must be a method's name or config object ({known}), got {method!r}")


@register_step2_method("tsq", SolverConfig)
def _solve_tsq(task: LayerTask) -> LayerSolution:
    """The step-2 solver: coded layers by the alternation, linear targets by least squares."""
    solver = replace(task.config.method, weight_bits=task.weight_bits)
    if task.quantizer is not None:
        return solve_layer(
            task.X,
            task.Y,
            task.quantizer,
            init=task.init,
            bias=task.bias,
            offset=task.offset,
            config=solver,
        )
    return solve_linear_layer(task.X, task.Y, init=task.init, bias=task.bias, config=solver)


@register_step2_method("adaround", AdaRoundConfig)
def _solve_adaround(task: LayerTask) -> LayerSolution:
    """AdaRound-style learned rounding of the same captured problem (baseline)."""
    return adaround_layer(
        task.X,
        task.Y,
        task.quantizer,
        task.init,
        task.weight_bits,
        bias=task.bias,
        offset=task.offset,
        config=task.config.method,
        seed=task.config.seed,
    )


@register_step2_method("otwa", OTWAConfig, needs_data=False)
def _solve_otwa(task: LayerTask) -> LayerSolution:
    """The BN-folded step-1 weights quantized per channel, no data (HWGQ-style baseline)."""
    start = time.perf_counter()
    codes, alpha = quantize_to_grid(task.init, task.grid)
    return LayerSolution(
        weight_codes=codes,
        alpha=alpha,
        bias=task.bias,
        history=[],
        agreement_init=float("nan"),
        agreement=float("nan"),
        relative_error_init=float("nan"),
        relative_error=float("nan"),
        seconds=time.perf_counter() - start,
    )


def _bare_task(step1: nn.Module, layer: Layer, fmt, cfg: TransformConfig) -> LayerTask:
    """The layer's task without data: the BN-folded step-1 weights and the BN shift."""
    weight = step1.get_submodule(layer.name).weight.detach()
    scale, shift = bn_affine(step1, layer)
    init = weight.reshape(weight.shape[0], -1) * scale[:, None]
    return LayerTask(layer, init, shift, fmt, WeightGrid.from_spec(fmt), cfg)


def _capture(task, index, kind, step1, source, calibration, cfg, memory, targets=None) -> None:
    """Fill the task's rows: its inputs from ``source`` and its targets (``targets`` when
    captured already) from the step-1 model, at the same sampled positions."""
    coded = kind == "codes"
    if targets is None:  # FP targets are captured per layer: kept for all they would add up
        targets = capture_targets(step1, {index: (task.layer, kind)}, calibration, cfg)[index]
    X, offset = capture_layer_inputs(
        task.layer, index, source, calibration, cfg, coded and task.layer.residual, memory.cache_mb
    )
    task.X, task.Y, task.offset = X, targets, (offset if coded else None)
    task.quantizer = step1.get_submodule(task.layer.activation) if coded else None


def _quality(sol: LayerSolution) -> float:
    """Higher is better: code agreement (coded layers) or 1 - relative error (linear targets)."""
    return sol.agreement if math.isfinite(sol.agreement) else 1.0 - sol.relative_error


def choose_formats(step1, todo, kinds, calibration, cfg, memory, method) -> dict:
    """Mixed precision under ``cfg.weight_budget`` (average bits per quantized weight).

    Each layer's problem is captured from the step-1 model (parallel mode) and solved in both
    formats; its gain is the rise of its quality (code agreement, or 1 - relative error for a
    linear target) per added bit of the whole layer. Layers are upgraded to
    ``cfg.budget_format`` in order of gain per bit while the average stays within the budget
    (layers no format change helps stay as they are). Returns {"formats", "average_bits",
    "budget", "gains"}."""
    base, rich = WeightGrid.from_spec(cfg.weight_bits), WeightGrid.from_spec(cfg.budget_format)
    added_bits = rich.information_bits - base.information_bits  # per weight of an upgrade
    # the budget is over the layers at weight_bits (int8 boundary layers stay as they are)
    free = [i for i, layer in enumerate(todo) if _boundary_format(cfg, layer) == cfg.weight_bits]
    if not free:  # every quantized layer has a boundary format: nothing to choose
        return {"formats": {}, "average_bits": None, "budget": cfg.weight_budget, "gains": {}}
    sizes = {todo[i].name: step1.get_submodule(todo[i].name).weight.numel() for i in free}
    gains = {}
    for i in free:  # TransformConfig refuses a budget with a method that needs no data
        layer = todo[i]
        task = _bare_task(step1, layer, cfg.weight_bits, cfg)
        _capture(task, i, kinds[i], step1, step1, calibration, cfg, memory)
        quality = {}
        for fmt in (cfg.weight_bits, cfg.budget_format):
            trial = replace(task, weight_bits=fmt, grid=WeightGrid.from_spec(fmt))
            quality[fmt] = _quality(method.solve(trial))
        gain = quality[cfg.budget_format] - quality[cfg.weight_bits]
        gains[layer.name] = gain / (sizes[layer.name] * added_bits)
        del task
        release_freed_memory()
    total = sum(sizes.values())
    spent = base.information_bits * total
    formats = {}
    for name in sorted(gains, key=gains.get, reverse=True):
        cost = sizes[name] * added_bits
        if gains[name] > 0 and spent + cost <= cfg.weight_budget * total + 1e-9:
            formats[name], spent = cfg.budget_format, spent + cost
    formats |= {name: cfg.weight_bits for name in gains if name not in formats}
    if cfg.verbose:
        upgraded = [n for n, f in formats.items() if f == cfg.budget_format]
        print(
            f"[step2] budget {cfg.weight_budget} bits/weight: {spent / total:.3f} with "
            f"{cfg.budget_format} on {upgraded or 'no layer'}",
            flush=True,
        )
    return {
        "formats": formats,
        "average_bits": spent / total,
        "budget": cfg.weight_budget,
        "gains": gains,
    }


def transform(
    model_step1: nn.Module,
    calib_loader: Iterable,
    config: TransformConfig | None = None,
    report: list | None = None,
    memory: MemoryConfig | None = None,
) -> nn.Module:
    """Step 2: return a copy of the step-1 model whose weight layers are low-bit.

    ``report``, when given, receives one dict per solved layer (time, agreement, history); the
    first layer's ``capture_s`` includes the one pass that captures every layer's step-1 codes.
    ``memory`` trades speed for memory (MemoryConfig); the results do not depend on it.
    """
    cfg = config or TransformConfig()
    memory = memory or MemoryConfig()
    method = step2_method(cfg.method)
    if not any(isinstance(m, SparseQuantizer) for m in model_step1.modules()):
        raise ValueError(
            "the model has no sparse activation quantizers: pass the step-1 model "
            "(tsquant.prepare_step1(model), trained with its 2-bit activations) to transform"
        )
    check_finite(model_step1, "the step-1 model")
    # every pass below must see the same images, whatever the loader does (shuffle, one-shot)
    needs_data = method.needs_data or "int8" in (cfg.first_layer, cfg.last_layer)
    calibration = (  # int8 boundaries take their input scales from the calibration data
        draw_calibration(calib_loader, cfg.calib_images, cfg.input_key, cfg.device)
        if needs_data
        else []  # e.g. the OTWA baseline
    )
    # block temporaries go back to the OS; the process's allocator is restored afterwards
    with mmap_threshold(memory.mmap_threshold_mb * 2**20):
        # the caller's model keeps its mode, device and parameters
        step1 = copy.deepcopy(model_step1).to(cfg.device).eval()
        quantized = copy.deepcopy(step1).eval()
        layers = analyse(step1)
        todo = quantizable_layers(layers, cfg.first_layer, cfg.last_layer)
        formats = {layer.name: _boundary_format(cfg, layer) for layer in todo}
        kinds = [_target_kind(step1, layer) for layer in todo]
        budget = None
        if cfg.weight_budget is not None:
            budget = choose_formats(step1, todo, kinds, calibration, cfg, memory, method)
            formats |= budget["formats"]
        boundary = _int8_boundary(quantized, step1, calibration, cfg)
        quantized = boundary["model"]
        total = time.perf_counter()
        code_targets: dict[int, RowStore] = {}
        if method.needs_data:
            # the step-1 codes every coded layer reproduces, from one pass of the step-1 model
            wanted = {i: (layer, "codes") for i, layer in enumerate(todo) if kinds[i] == "codes"}
            code_targets = capture_targets(step1, wanted, calibration, cfg)
        bar = tqdm(todo, desc="step 2", unit="layer", disable=not cfg.verbose or None, leave=False)
        for index, layer in enumerate(bar):
            # the first layer's capture time includes the pass that captured all code targets
            start = total if index == 0 else time.perf_counter()
            task = _bare_task(step1, layer, formats[layer.name], cfg)
            grid = task.grid
            if not method.needs_data:
                sol = method.solve(task)
                write_back(quantized, layer, sol.weight_codes, sol.alpha, sol.bias, grid)
                if report is not None:
                    report.append(
                        {
                            "layer": layer.name,
                            "kind": method.name,
                            "solve_s": time.perf_counter() - start,
                        }
                    )
                continue
            source = quantized if cfg.mode == "sequential" else step1
            target_kind = kinds[index]
            coded = target_kind == "codes"
            _capture(
                task,
                index,
                target_kind,
                step1,
                source,
                calibration,
                cfg,
                memory,
                code_targets.pop(index, None),
            )
            X, Y, offset = task.X, task.Y, task.offset
            release_freed_memory()  # the capture's per-batch temporaries
            capture_s = time.perf_counter() - start
            sol = method.solve(task)
            write_back(quantized, layer, sol.weight_codes, sol.alpha, sol.bias, grid)
            row = {
                "layer": layer.name,
                "kind": "coded" if coded else target_kind,
                "rows": X.rows,
                "inputs": X.width,
                "channels": Y.width,
                "stored_mb": round(
                    (X.nbytes + Y.nbytes + (offset.nbytes if offset is not None else 0)) / 2**20, 2
                ),
                "capture_s": capture_s,
                "solve_s": sol.seconds,
                "agreement_init": sol.agreement_init,
                "agreement": sol.agreement,
                "relative_error_init": sol.relative_error_init,
                "relative_error": sol.relative_error,
                "history": sol.history,
                "peak_rss_mb": peak_rss_mb(),  # of the process so far: shows which layer raised it
            }
            if report is not None:
                report.append(row)
            if cfg.verbose:
                before, after = (
                    (sol.agreement_init, sol.agreement)
                    if coded
                    else (sol.relative_error_init, sol.relative_error)
                )
                metric = "agree" if coded else "rel.err"
                tqdm.write(
                    f"[step2 {index + 1}/{len(todo)}] {layer.name:<24} {X.rows}x{X.width}->{Y.width} "
                    f"{metric} {before:.4f} -> {after:.4f}  "
                    f"capture {capture_s:.1f}s solve {sol.seconds:.1f}s"
                )
            del X, Y, offset, sol, task
            release_freed_memory()
        if cfg.verbose:
            print(f"[step2] {len(todo)} layers in {time.perf_counter() - total:.1f}s", flush=True)
        # the plan, for the stages and tsquant.save: which layers, which method, which grid
        plan = {
            "method": method.name,
            "weight_bits": cfg.weight_bits,
            "layers": [x.name for x in todo],
            "formats": formats,
            "input_quantizer": boundary["input_quantizer"],
            "head_inputs": boundary["head_inputs"],
            "budget": budget,
        }
        set_record(quantized, "tsquant_step2", plan)
        return quantized


def step2_plan(model: nn.Module) -> dict | None:
    """What :func:`transform` did to make ``model``: {"method", "weight_bits", "layers",
    "formats" (layer -> weight format)}."""
    return get_record(model, "tsquant_step2")
