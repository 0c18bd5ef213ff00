"""Capture for step 2: forward hooks that take a layer's inputs, step-1 targets and residual
offsets at sampled positions, from a model run over the calibration batches.

Every layer's sampled positions come from their own seeded stream (:func:`layer_positions`), so
the pass that captures all layers' step-1 targets and the per-layer passes that capture each
layer's inputs sample the same rows. Captured tensors are copies: an in-place operation later in
the forward pass (``out += shortcut``) cannot change what was captured.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .calibration import draw_calibration
from .solver.rows import CacheBudget, RowStore
from .surgery import Layer


class _Stop(Exception):
    pass


class Capture:
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
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as exc:  # e.g. a shape mismatch deep inside a conv
            reason = str(exc).strip().splitlines()[0]
            raise ValueError(
                f"the model cannot run on calibration inputs of shape {tuple(x.shape)} "
                f"({type(exc).__name__}: {reason}): give step 2 data shaped and typed like the "
                "training data"
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


def layer_positions(seed: int, index: int) -> torch.Generator:
    """The stream of sampled positions of the index-th solved layer: the pass that captures its
    targets and the pass that captures its inputs draw the same positions from it."""
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


def sample_positions(
    n_images: int, spatial: int, per_image: int, gen: torch.Generator
) -> torch.Tensor:
    """(n_images, P) random distinct output positions per image."""
    p = min(per_image, spatial)
    return torch.rand(n_images, spatial, generator=gen).argsort(dim=1)[:, :p]


def sampled_positions(out: torch.Tensor, per_image: int, gen: torch.Generator):
    """Positions of a conv layer's output map (N, C, H, W) to sample; None for (N, C) outputs."""
    if out.dim() != 4:
        return None
    spatial = out.shape[2] * out.shape[3]
    return sample_positions(out.shape[0], spatial, per_image, gen).to(out.device)


def rows_from_map(t: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) at positions (N, P) -> (N * P, C)."""
    flat = t.flatten(2)  # N, C, L
    picked = flat.gather(2, pos[:, None, :].expand(-1, flat.shape[1], -1))
    return picked.permute(0, 2, 1).reshape(-1, flat.shape[1])


def patch_rows(
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


def calibration_batches(calibration: Iterable, max_images: int | None, device):
    """The calibration batches; a loader is read once first (see tsquant.calibration), so
    every pass over the result sees the same images."""
    drawn = isinstance(calibration, list) and all(isinstance(b, torch.Tensor) for b in calibration)
    return calibration if drawn else draw_calibration(calibration, max_images, device=device)


TARGET_MODULE = {  # target kind -> where the step-1 model shows it
    "codes": lambda layer: layer.activation,  # the step-1 codes after the layer
    "pre": lambda layer: layer.bn,  # the BN output (a linear layer added into a coded chain)
    "out": lambda layer: layer.name,  # the layer output (a head)
}


def capture_targets(step1: nn.Module, wanted: dict, loader, cfg) -> dict[int, RowStore]:
    """Targets of several layers from one forward pass of the step-1 model per batch.

    wanted: index of the solved layer -> (layer, target kind). Each target map is reduced to
    the rows at the layer's sampled positions inside its hook, so one batch holds rows, not
    maps; codes are stored packed (a few values)."""
    gens = {i: layer_positions(cfg.seed, i) for i in wanted}

    def rows_of(index, out):
        pos = sampled_positions(out, cfg.positions_per_image, gens[index])
        return out.flatten(1).clone() if pos is None else rows_from_map(out, pos)

    where = {i: (TARGET_MODULE[kind](layer), "output") for i, (layer, kind) in wanted.items()}
    cap = Capture(step1, where, reduce=rows_of)
    stores = {i: RowStore() for i in wanted}
    try:
        with torch.no_grad():
            for x in calibration_batches(loader, cfg.calib_images, cfg.device):
                for index, rows in cap.run(x).items():
                    stores[index].append(rows)
    finally:
        cap.close()
    return stores


def capture_layer_inputs(
    layer: Layer, index: int, source: nn.Module, loader, cfg, offsets: bool, cache_mb: int = 128
):
    """Row stores of X and (offsets: True) the residual offsets of the index-th solved layer,
    from one forward pass of ``source`` per batch, at the positions its targets were sampled
    at, keeping up to ``cache_mb`` MB decoded for the solver's passes. Without offsets this is
    the data pass any solver of the layer's statistics needs."""
    gen = layer_positions(cfg.seed, index)
    wanted = {"x": (layer.name, "input"), "out": (layer.name, "output")}
    if offsets:
        wanted |= {"bn": (layer.bn, "output"), "pre": (layer.activation, "input")}
    module = source.get_submodule(layer.name)
    # one block per calibration batch, kept compactly (step-1 codes take a few values)
    budget = CacheBudget(cache_mb * 2**20)
    xs = RowStore(cache=budget)
    offs = RowStore(cache=budget) if offsets else None

    def reduce(key, t):  # keep the layer output's positions only, not the map
        if key == "out":
            return sampled_positions(t, cfg.positions_per_image, gen)
        return t.clone()  # the block's add may be in place (`out += shortcut`)

    cap = Capture(source, wanted, reduce)
    try:
        with torch.no_grad():
            for x in calibration_batches(loader, cfg.calib_images, cfg.device):
                got = cap.run(x)
                pos = got["out"]
                offset = got["pre"] - got["bn"] if offs is not None else None
                if isinstance(module, nn.Conv2d):
                    xs.append(patch_rows(module, got["x"], pos))
                    if offset is not None:
                        offs.append(rows_from_map(offset, pos))
                else:
                    xs.append(got["x"].flatten(1))
                    if offset is not None:
                        offs.append(offset.flatten(1))
    finally:
        cap.close()
    return xs, offs


__all__ = [
    "Capture",
    "TARGET_MODULE",
    "calibration_batches",
    "capture_layer_inputs",
    "capture_targets",
    "layer_positions",
    "patch_rows",
    "rows_from_map",
    "sample_positions",
    "sampled_positions",
]
