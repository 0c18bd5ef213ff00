"""Step-2 driver over a whole model (TSQ-METHOD.md, "Step 2" and the [choice] list).

Layer by layer in topological order: capture the layer's inputs (sequential: from the model whose
earlier layers are already quantized; parallel: from the step-1 model) and its step-1 targets at
the same sampled positions, solve, write the low-bit layer back. Only one layer's data is held
at a time; forward passes stop as soon as the layer's tensors are captured.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .calibration import draw_calibration
from .quantizers.activation import SparseQuantizer
from .quantizers.weight import WeightGrid, quantize_to_grid
from .solver.alternation import SolverConfig, solve_layer, solve_linear_layer
from .solver.rows import (
    CacheBudget,
    RowStore,
    peak_rss_mb,
    release_freed_memory,
    set_mmap_threshold,
)
from .surgery import Layer, analyse, bn_affine, check_finite, quantizable_layers, write_back


@dataclass
class TransformConfig:
    """Options of step 2 over a model; every field has a default (see README, "Step 2")."""

    weight_bits: str | int = "ternary"
    # "tsq": the step-2 solver; "otwa": each layer's BN-folded step-1 weights quantized directly
    # per channel (OTWA for ternary), no data: the HWGQ-style baseline without step 2;
    # "adaround": learned rounding on the same captured problem (tsquant.baselines.adaround)
    method: str = "tsq"
    adaround_iters: int = 10_000
    mode: str = "sequential"  # or "parallel": inputs are the step-1 codes
    # shortcuts for the solver's options (None: the value in `solver`); giving one here and a
    # different one in `solver` is an error, so no setting is silently dropped
    lam: float | None = None
    iters: int | None = None
    variant: str | None = None  # "tsquant" or "paper"
    start: str | None = None  # "gptq" or "otwa": how the step-1 weights are rounded
    positions_per_image: int = 64  # sampled output positions per image for conv layers
    cache_mb: int = 128  # per layer: decoded rows and bin bounds kept for the solver's passes
    # heap blocks this large or larger go to mmap (glibc; 0: leave the allocator alone): less
    # peak memory, but every such block is a fresh mapping to fault in (ResNet-20, 1,024 images:
    # 4 MB took 174 s against 85 s, README "Step 2 at scale"), so it is opt-in
    mmap_threshold_mb: int = 0
    max_images: int | None = None  # cap on calibration images (None: the whole loader)
    input_key: str | None = None  # dict batches: the images' key (None: tsquant.calibration)
    first_layer: str = "fp"  # "fp" or "quantize"
    last_layer: str = "fp"
    seed: int = 0
    device: str = "cpu"
    verbose: bool = True
    solver: SolverConfig = field(default_factory=SolverConfig)

    def __post_init__(self):
        if self.method not in ("tsq", "otwa", "adaround"):
            raise ValueError(f"method must be 'tsq', 'otwa' or 'adaround', got {self.method!r}")
        if self.mode not in ("sequential", "parallel"):
            raise ValueError(f"mode must be 'sequential' or 'parallel', got {self.mode!r}")
        for name in ("first_layer", "last_layer"):
            if getattr(self, name) not in ("fp", "quantize"):
                raise ValueError(f"{name} must be 'fp' or 'quantize', got {getattr(self, name)!r}")
        if not isinstance(self.positions_per_image, int) or self.positions_per_image < 1:
            raise ValueError(
                f"positions_per_image must be an integer >= 1, got {self.positions_per_image!r}"
            )
        for name in ("cache_mb", "mmap_threshold_mb"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        WeightGrid.from_spec(self.weight_bits)
        defaults = SolverConfig()
        merged = asdict(self.solver)
        grid, solver_grid = WeightGrid.from_spec(self.weight_bits), merged["weight_bits"]
        if grid == WeightGrid.from_spec(defaults.weight_bits):
            self.weight_bits = solver_grid  # set only in the solver (or nowhere)
        elif WeightGrid.from_spec(solver_grid) not in (grid, WeightGrid.from_spec("ternary")):
            raise ValueError(
                f"TransformConfig.weight_bits={self.weight_bits!r} but "
                f"solver.weight_bits={solver_grid!r}: give it once"
            )
        merged["weight_bits"] = self.weight_bits
        for name in ("lam", "iters", "variant", "start"):
            mine, theirs = getattr(self, name), merged[name]
            if mine is not None and theirs != getattr(defaults, name) and theirs != mine:
                raise ValueError(
                    f"TransformConfig.{name}={mine!r} but solver.{name}={theirs!r}: give it once"
                )
            if mine is not None:
                merged[name] = mine
        self.solver = SolverConfig(**merged)
        for name in ("lam", "iters", "variant", "start"):
            setattr(self, name, merged[name])  # read back: one value per concept


class _Stop(Exception):
    pass


class _Capture:
    """Forward hooks that grab named tensors and stop the pass once all have arrived."""

    def __init__(self, model: nn.Module, wanted: dict, reduce=None):
        # wanted: key -> (module name, "input" | "output"); reduce(key, tensor), when given, is
        # applied in the hook, so only what it returns is held until the pass ends. It must not
        # keep the tensor by reference: a later in-place op (`out += shortcut`, relu_) would
        # change what was captured; the default keeps a copy.
        self.model, self.wanted, self.got, self.handles = model, wanted, {}, []
        self.reduce = reduce or (lambda key, t: t.clone())
        self.active = False  # two captures may hook the same model (parallel mode)
        for key, (name, where) in wanted.items():
            module = model.get_submodule(name)
            if where == "input":
                self.handles.append(module.register_forward_pre_hook(self._pre(key)))
            else:
                self.handles.append(module.register_forward_hook(self._post(key)))

    def _done(self):
        if len(self.got) == len(self.wanted):
            raise _Stop

    def _pre(self, key):
        def hook(module, args):
            if self.active and key not in self.got:  # a module run twice: its first call
                self.got[key] = self.reduce(key, args[0].detach())
                self._done()

        return hook

    def _post(self, key):
        def hook(module, args, output):
            if self.active and key not in self.got:
                self.got[key] = self.reduce(key, output.detach())
                self._done()

        return hook

    def run(self, x) -> dict[str, torch.Tensor]:
        self.got, self.active = {}, True
        try:
            self.model(x)
        except _Stop:
            pass
        except RuntimeError as exc:  # e.g. a shape mismatch deep inside a conv
            reason = str(exc).strip().splitlines()[0]
            raise ValueError(
                f"the model cannot run on calibration inputs of shape {tuple(x.shape)} ({reason}): "
                "give step 2 data shaped like the training data"
            ) from None
        finally:
            self.active = False
        if len(self.got) != len(self.wanted):
            missing = sorted(set(self.wanted) - set(self.got))
            raise RuntimeError(f"forward pass never reached {missing}")
        return self.got

    def close(self):
        for h in self.handles:
            h.remove()


def _layer_positions(seed: int, index: int) -> torch.Generator:
    """The stream of sampled positions of the index-th solved layer: the pass that captures its
    targets and the pass that captures its inputs draw the same positions from it."""
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


def _positions(n_images: int, spatial: int, per_image: int, gen: torch.Generator) -> torch.Tensor:
    """(n_images, P) random distinct output positions per image."""
    p = min(per_image, spatial)
    return torch.rand(n_images, spatial, generator=gen).argsort(dim=1)[:, :p]


def _sampled_positions(out: torch.Tensor, per_image: int, gen: torch.Generator):
    """Positions of a conv layer's output map (N, C, H, W) to sample; None for (N, C) outputs."""
    if out.dim() != 4:
        return None
    spatial = out.shape[2] * out.shape[3]
    return _positions(out.shape[0], spatial, per_image, gen).to(out.device)


def _rows_from_map(t: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) at positions (N, P) -> (N * P, C)."""
    flat = t.flatten(2)  # N, C, L
    picked = flat.gather(2, pos[:, None, :].expand(-1, flat.shape[1], -1))
    return picked.permute(0, 2, 1).reshape(-1, flat.shape[1])


def _patch_rows(
    conv: nn.Conv2d, x: torch.Tensor, pos: torch.Tensor, chunk: int = 32
) -> torch.Tensor:
    """im2col rows of the conv input at output positions pos: (N * P, C_in * kh * kw).

    Gathers only the sampled patches (F.unfold would build all of them first); the column order
    is unfold's (channel, kernel row, kernel column)."""
    if conv.padding_mode != "zeros":
        raise ValueError(f"padding_mode={conv.padding_mode!r} is not supported, use zeros")
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = (
        conv.kernel_size,
        conv.stride,
        conv.dilation,
        conv.padding,
    )
    padded = F.pad(x, (pw, pw, ph, ph))
    width = padded.shape[3]
    out_w = (width - dw * (kw - 1) - 1) // sw + 1
    ky = torch.arange(kh, device=x.device) * dh
    kx = torch.arange(kw, device=x.device) * dw
    rows = []
    for s in range(0, x.shape[0], chunk):
        p = pos[s : s + chunk]
        top, left = (p // out_w) * sh, (p % out_w) * sw  # (n, P) corner of each patch
        flat = (top[..., None, None] + ky[:, None]) * width + left[..., None, None] + kx
        n, c = p.shape[0], padded.shape[1]
        index = flat.reshape(n, 1, -1).expand(-1, c, -1)
        picked = padded[s : s + chunk].flatten(2).gather(2, index)  # n, C, P * kh * kw
        picked = picked.view(n, c, p.shape[1], kh * kw).permute(0, 2, 1, 3)
        rows.append(picked.reshape(-1, c * kh * kw))
    return torch.cat(rows)


def _batches(calibration: Iterable, max_images: int | None, device):
    """The calibration batches; a loader is read once first (see tsquant.calibration), so
    every pass over the result sees the same images."""
    drawn = isinstance(calibration, list) and all(isinstance(b, torch.Tensor) for b in calibration)
    return calibration if drawn else draw_calibration(calibration, max_images, device=device)


_TARGET_MODULE = {  # target kind -> where the step-1 model shows it
    "codes": lambda layer: layer.activation,  # the step-1 codes after the layer
    "pre": lambda layer: layer.bn,  # the BN output (a linear layer added into a coded chain)
    "out": lambda layer: layer.name,  # the layer output (a head)
}


def _capture_targets(step1: nn.Module, wanted: dict, loader, cfg) -> dict[int, RowStore]:
    """Targets of several layers from one forward pass of the step-1 model per batch.

    wanted: index of the solved layer -> (layer, target kind). Each target map is reduced to
    the rows at the layer's sampled positions inside its hook, so one batch holds rows, not
    maps; codes are stored packed (a few values)."""
    gens = {i: _layer_positions(cfg.seed, i) for i in wanted}

    def rows_of(index, out):
        pos = _sampled_positions(out, cfg.positions_per_image, gens[index])
        return out.flatten(1).clone() if pos is None else _rows_from_map(out, pos)

    where = {i: (_TARGET_MODULE[kind](layer), "output") for i, (layer, kind) in wanted.items()}
    cap = _Capture(step1, where, reduce=rows_of)
    stores = {i: RowStore() for i in wanted}
    try:
        with torch.no_grad():
            for x in _batches(loader, cfg.max_images, cfg.device):
                for index, rows in cap.run(x).items():
                    stores[index].append(rows)
    finally:
        cap.close()
    return stores


def _collect(layer: Layer, index: int, source: nn.Module, loader, cfg, offsets: bool):
    """Row stores of X and (offsets: True) the residual offsets of the index-th solved layer,
    from one forward pass of ``source`` per batch, at the positions its targets were sampled
    at. Without offsets this is the data pass any solver of the layer's statistics needs."""
    gen = _layer_positions(cfg.seed, index)
    wanted = {"x": (layer.name, "input"), "out": (layer.name, "output")}
    if offsets:
        wanted |= {"bn": (layer.bn, "output"), "pre": (layer.activation, "input")}
    module = source.get_submodule(layer.name)
    # one block per calibration batch, kept compactly (step-1 codes take a few values)
    budget = CacheBudget(cfg.cache_mb * 2**20)
    xs = RowStore(cache=budget)
    offs = RowStore(cache=budget) if offsets else None

    def reduce(key, t):  # keep the layer output's positions only, not the map
        if key == "out":
            return _sampled_positions(t, cfg.positions_per_image, gen)
        return t.clone()  # the block's add may be in place (`out += shortcut`)

    cap = _Capture(source, wanted, reduce)
    try:
        with torch.no_grad():
            for x in _batches(loader, cfg.max_images, cfg.device):
                got = cap.run(x)
                pos = got["out"]
                offset = got["pre"] - got["bn"] if offs is not None else None
                if isinstance(module, nn.Conv2d):
                    xs.append(_patch_rows(module, got["x"], pos))
                    if offset is not None:
                        offs.append(_rows_from_map(offset, pos))
                else:
                    xs.append(got["x"].flatten(1))
                    if offset is not None:
                        offs.append(offset.flatten(1))
    finally:
        cap.close()
    return xs, offs


def _target_kind(step1: nn.Module, layer: Layer) -> str:
    activation = step1.get_submodule(layer.activation) if layer.activation else None
    if layer.kind == "coded" and isinstance(activation, SparseQuantizer):
        return "codes"
    return "pre" if layer.bn else "out"


def transform(
    model_step1: nn.Module,
    calib_loader: Iterable,
    config: TransformConfig | None = None,
    report: list | None = None,
) -> nn.Module:
    """Step 2: return a copy of the step-1 model whose weight layers are low-bit.

    ``report``, when given, receives one dict per solved layer (time, agreement, history); the
    first layer's ``capture_s`` includes the one pass that captures every layer's step-1 codes.
    """
    cfg = config or TransformConfig()
    if not any(isinstance(m, SparseQuantizer) for m in model_step1.modules()):
        raise ValueError(
            "the model has no sparse activation quantizers: pass the step-1 model "
            "(tsquant.prepare_step1(model), trained with its 2-bit activations) to transform"
        )
    check_finite(model_step1, "the step-1 model")
    # every pass below must see the same images, whatever the loader does (shuffle, one-shot)
    calibration = (
        []  # the OTWA baseline needs no data
        if cfg.method == "otwa"
        else draw_calibration(calib_loader, cfg.max_images, cfg.input_key, cfg.device)
    )
    set_mmap_threshold(cfg.mmap_threshold_mb * 2**20)  # block temporaries go back to the OS
    # the caller's model keeps its mode, device and parameters
    step1 = copy.deepcopy(model_step1).to(cfg.device).eval()
    quantized = copy.deepcopy(step1).eval()
    layers = analyse(step1)
    todo = quantizable_layers(layers, cfg.first_layer, cfg.last_layer)
    grid = WeightGrid.from_spec(cfg.weight_bits)
    total = time.perf_counter()
    kinds = [_target_kind(step1, layer) for layer in todo]
    code_targets: dict[int, RowStore] = {}
    if cfg.method != "otwa":
        # the step-1 codes every coded layer reproduces, from one pass of the step-1 model
        wanted = {i: (layer, "codes") for i, layer in enumerate(todo) if kinds[i] == "codes"}
        code_targets = _capture_targets(step1, wanted, calibration, cfg)
    bar = tqdm(todo, desc="step 2", unit="layer", disable=not cfg.verbose or None, leave=False)
    for index, layer in enumerate(bar):
        # the first layer's capture time includes the pass that captured all code targets
        start = total if index == 0 else time.perf_counter()
        if cfg.method == "otwa":
            weight = step1.get_submodule(layer.name).weight.detach()
            scale, shift = bn_affine(step1, layer)
            codes, alpha = quantize_to_grid(
                weight.reshape(weight.shape[0], -1) * scale[:, None], grid
            )
            write_back(quantized, layer, codes, alpha, shift, grid)
            if report is not None:
                report.append(
                    {"layer": layer.name, "kind": "otwa", "solve_s": time.perf_counter() - start}
                )
            continue
        source = quantized if cfg.mode == "sequential" else step1
        target_kind = kinds[index]
        coded = target_kind == "codes"
        activation = step1.get_submodule(layer.activation) if coded else None
        if coded:
            Y = code_targets.pop(index)
        else:  # FP targets are captured per layer: kept for all layers they would add up
            Y = _capture_targets(step1, {index: (layer, target_kind)}, calibration, cfg)[index]
        X, offset = _collect(layer, index, source, calibration, cfg, coded and layer.residual)
        weight = step1.get_submodule(layer.name).weight.detach()
        scale, shift = bn_affine(step1, layer)
        init = weight.reshape(weight.shape[0], -1) * scale[:, None]
        release_freed_memory()  # the capture's per-batch temporaries
        capture_s = time.perf_counter() - start
        if cfg.method == "adaround":
            from .baselines.adaround import AdaRoundConfig, adaround_layer

            sol = adaround_layer(
                X,
                Y,
                activation if coded else None,
                init,
                cfg.weight_bits,
                bias=shift,
                offset=offset if coded else None,
                config=AdaRoundConfig(iters=cfg.adaround_iters, seed=cfg.seed),
            )
        elif coded:
            sol = solve_layer(
                X, Y, activation, init=init, bias=shift, offset=offset, config=cfg.solver
            )
        else:
            sol = solve_linear_layer(X, Y, init=init, bias=shift, config=cfg.solver)
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
        del X, Y, offset, sol
        release_freed_memory()
    if cfg.verbose:
        print(f"[step2] {len(todo)} layers in {time.perf_counter() - total:.1f}s", flush=True)
    return quantized
