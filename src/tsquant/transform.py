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

from .quantizers.activation import SparseQuantizer
from .quantizers.weight import WeightGrid, quantize_to_grid
from .solver.alternation import SolverConfig, solve_layer, solve_linear_layer
from .solver.rows import CacheBudget, RowStore
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
    lam: float = 3.0
    iters: int = 20
    variant: str = "tsquant"  # or "paper"
    positions_per_image: int = 64  # sampled output positions per image for conv layers
    cache_mb: int = 128  # per layer: decoded rows and bin bounds kept for the solver's passes
    max_images: int | None = None  # cap on calibration images (None: the whole loader)
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
        WeightGrid.from_spec(self.weight_bits)
        self.solver = SolverConfig(
            **{
                **asdict(self.solver),
                "weight_bits": self.weight_bits,
                "lam": self.lam,
                "iters": self.iters,
                "variant": self.variant,
            }
        )


class _Stop(Exception):
    pass


class _Capture:
    """Forward hooks that grab named tensors and stop the pass once all have arrived."""

    def __init__(self, model: nn.Module, wanted: dict[str, tuple[str, str]]):
        # wanted: key -> (module name, "input" | "output")
        self.model, self.wanted, self.got, self.handles = model, wanted, {}, []
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
            if self.active:
                self.got[key] = args[0].detach()
                self._done()

        return hook

    def _post(self, key):
        def hook(module, args, output):
            if self.active:
                self.got[key] = output.detach()
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


def _positions(n_images: int, spatial: int, per_image: int, gen: torch.Generator) -> torch.Tensor:
    """(n_images, P) random distinct output positions per image."""
    p = min(per_image, spatial)
    return torch.rand(n_images, spatial, generator=gen).argsort(dim=1)[:, :p]


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


def _batches(loader: Iterable, max_images: int | None, device):
    seen = 0
    for index, batch in enumerate(loader):
        x = batch[0] if isinstance(batch, list | tuple) else batch
        if not torch.isfinite(x).all():
            raise ValueError(
                f"calibration batch {index} contains NaN or Inf values: clean or re-decode the data"
            )
        if max_images is not None:
            if seen >= max_images:
                break
            x = x[: max_images - seen]
        seen += x.shape[0]
        yield x.to(device)
    if seen == 0:
        raise ValueError(
            "the calibration loader yielded no images: give step 2 some training images"
        )


def _collect(layer: Layer, source: nn.Module, step1: nn.Module, loader, cfg, gen, target_kind):
    """Row stores of X, targets and (residual) offsets of one layer over the calibration set.

    target_kind None: X alone, from one forward pass of ``source`` per batch (no targets, no
    offsets): the data pass any solver of the layer's statistics needs."""
    inputs_only = target_kind is None
    src_wanted = {"x": (layer.name, "input")}
    if inputs_only:
        src_wanted["out"] = (layer.name, "output")  # its shape places the sampled positions
    elif layer.residual:
        src_wanted |= {"bn": (layer.bn, "output"), "pre": (layer.activation, "input")}
    src_cap = _Capture(source, src_wanted)
    tgt_cap = None
    if not inputs_only:
        tgt_cap = _Capture(
            step1,
            {
                "y": {
                    "codes": (layer.activation, "output"),
                    "pre": (layer.bn, "output"),
                    "out": (layer.name, "output"),
                }[target_kind]
            },
        )
    module = source.get_submodule(layer.name)
    # one block per calibration batch, kept compactly (step-1 codes take a few values)
    budget = CacheBudget(cfg.cache_mb * 2**20)
    xs = RowStore(cache=budget)
    ys = None if inputs_only else RowStore()
    offs = RowStore(cache=budget) if layer.residual and not inputs_only else None
    try:
        with torch.no_grad():
            for x in _batches(loader, cfg.max_images, cfg.device):
                got = src_cap.run(x)
                y = got["out"] if inputs_only else tgt_cap.run(x)["y"]
                offset = got["pre"] - got["bn"] if offs is not None else None
                if isinstance(module, nn.Conv2d):
                    spatial = y.shape[2] * y.shape[3]
                    pos = _positions(x.shape[0], spatial, cfg.positions_per_image, gen).to(x.device)
                    xs.append(_patch_rows(module, got["x"], pos))
                    if ys is not None:
                        ys.append(_rows_from_map(y, pos))
                    if offset is not None:
                        offs.append(_rows_from_map(offset, pos))
                else:
                    xs.append(got["x"].flatten(1))
                    if ys is not None:
                        ys.append(y.flatten(1))
                    if offset is not None:
                        offs.append(offset.flatten(1))
    finally:
        src_cap.close()
        if tgt_cap is not None:
            tgt_cap.close()
    return xs, ys, offs


def transform(
    model_step1: nn.Module,
    calib_loader: Iterable,
    config: TransformConfig | None = None,
    report: list | None = None,
) -> nn.Module:
    """Step 2: return a copy of the step-1 model whose weight layers are low-bit.

    ``report``, when given, receives one dict per solved layer (time, agreement, history).
    """
    cfg = config or TransformConfig()
    check_finite(model_step1, "the step-1 model")
    step1 = model_step1.to(cfg.device).eval()
    quantized = copy.deepcopy(step1).eval()
    layers = analyse(step1)
    todo = quantizable_layers(layers, cfg.first_layer, cfg.last_layer)
    gen = torch.Generator().manual_seed(cfg.seed)
    grid = WeightGrid.from_spec(cfg.weight_bits)
    total = time.perf_counter()
    bar = tqdm(todo, desc="step 2", unit="layer", disable=not cfg.verbose or None, leave=False)
    for index, layer in enumerate(bar, 1):
        start = time.perf_counter()
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
        activation = step1.get_submodule(layer.activation) if layer.activation else None
        coded = layer.kind == "coded" and isinstance(activation, SparseQuantizer)
        target_kind = "codes" if coded else ("pre" if layer.bn else "out")
        X, Y, offset = _collect(layer, source, step1, calib_loader, cfg, gen, target_kind)
        weight = step1.get_submodule(layer.name).weight.detach()
        scale, shift = bn_affine(step1, layer)
        init = weight.reshape(weight.shape[0], -1) * scale[:, None]
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
                f"[step2 {index}/{len(todo)}] {layer.name:<24} {X.rows}x{X.width}->{Y.width} "
                f"{metric} {before:.4f} -> {after:.4f}  "
                f"capture {capture_s:.1f}s solve {sol.seconds:.1f}s"
            )
        del X, Y, offset
    if cfg.verbose:
        print(f"[step2] {len(todo)} layers in {time.perf_counter() - total:.1f}s", flush=True)
    return quantized
