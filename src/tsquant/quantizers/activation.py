"""Step 1: the sparse activation quantizer (TSQ-METHOD.md, "Step 1: sparse activation quantization").

Levels are {0, d, 2d, ..., (2^bits - 1) d}. Inputs at or below ``eps`` map to 0; above it the
bins are centred on the levels, so the thresholds are [eps, 1.5d, 2.5d, ..., (2^bits - 1.5) d].
Everything here is a pure function of tensors; :class:`SparseQuantizer` is a thin module on top.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import torch
from torch import nn

_STANDARD_NORMAL = NormalDist()


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(
            f"activation bits must be an integer in 1..8, got {bits!r}: pass e.g. bits=2"
        )


def _check_eps_step(eps: float, step: float, bits: int) -> None:
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}: use e.g. eps=0.32")
    if not math.isfinite(step) or step <= 0:
        raise ValueError(f"quantizer step d must be > 0, got {step!r}")
    if bits >= 2 and eps >= 1.5 * step:
        raise ValueError(
            f"eps={eps:.4g} must be below the second threshold 1.5*d={1.5 * step:.4g}, "
            "otherwise level 1 is empty: lower eps or use a larger step"
        )


def num_levels(bits: int) -> int:
    return 2**bits


def thresholds(step: float, eps: float, bits: int) -> torch.Tensor:
    """The 2^bits - 1 bin edges t_1 < ... < t_{L-1}; code = number of edges strictly below x."""
    _check_bits(bits)
    _check_eps_step(eps, step, bits)
    upper = [(k + 0.5) * step for k in range(1, num_levels(bits) - 1)]
    return torch.tensor([eps, *upper], dtype=torch.float64)


def levels(step: float, bits: int) -> torch.Tensor:
    return torch.arange(num_levels(bits), dtype=torch.float64) * step


def count_edges_below(x: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """uint8 count of the (sorted) edges strictly smaller than each x: bucketize(right=False).

    With at most 7 edges (up to 3 bits) a comparison per edge is several times faster than
    bucketize's binary search, and gives the same codes (the edges are in x's dtype). The
    comparisons run on a dense view of x: on a channels-last tensor they are about twice as
    slow in its NCHW shape (benchmarks/throughput.py)."""
    edges = edges.to(dtype=x.dtype)
    dense, restore = _dense_view(x.detach())
    if edges.numel() > 7:
        return restore(torch.bucketize(dense, edges, right=False).to(torch.uint8))
    values = edges.tolist()
    codes = (dense > values[0]).to(torch.uint8)
    for edge in values[1:]:
        codes += dense > edge
    return restore(codes)


def _dense_view(x: torch.Tensor):
    """(a contiguous view of x's memory, the function mapping a result back to x's layout)."""
    if (
        x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    ):
        return x.permute(0, 2, 3, 1), lambda t: t.permute(0, 3, 1, 2)
    return x.contiguous(), lambda t: t


def quantize_codes(x: torch.Tensor, step: float, eps: float, bits: int) -> torch.Tensor:
    """Integer codes 0..2^bits-1 of x (uint8); x <= eps gives 0, bins are right-closed."""
    # code = number of edges strictly smaller than x: exactly Q's bins
    return count_edges_below(x, thresholds(step, eps, bits).to(device=x.device))


def codes_to_values(codes: torch.Tensor, step: float, dtype=torch.float32) -> torch.Tensor:
    return codes.to(dtype) * step


def _straight_through_grad(grad_out: torch.Tensor, x: torch.Tensor, upper: float) -> torch.Tensor:
    """grad_out where 0 < x < upper, else 0, in x's memory layout.

    hardtanh's backward is exactly this mask in one pass (a comparison mask and a product took
    8x as long on ResNet-20's maps), but its result takes grad_out's layout. The gradient that
    reaches a quantizer through a residual sum or a pooling head is often NCHW while x is
    channels-last, and passed on like that it made every BN backward below it about 5x slower.
    Writing into a tensor laid out like x converts it once, at the first quantizer."""
    grad = torch.empty_like(x)
    return torch.ops.aten.hardtanh_backward.grad_input(grad_out, x, 0.0, upper, grad_input=grad)


def values_to_codes(values: torch.Tensor, step: float, bits: int) -> torch.Tensor:
    """Inverse of :func:`codes_to_values` for tensors on the quantizer's levels."""
    codes = torch.round(values.detach().double() / step)
    if codes.numel() and (codes.min() < 0 or codes.max() > num_levels(bits) - 1):
        raise ValueError("values lie outside the quantizer's levels: are step and bits right?")
    return codes.to(torch.uint8)


class _SparseQuantizeSTE(torch.autograd.Function):
    """Forward: Q(x). Backward: straight-through with gradient 1 on 0 < x < (2^bits - 1) d
    (the lower edge is 0, not eps, as in the released model)."""

    @staticmethod
    def forward(ctx, x, step, eps, bits):
        ctx.save_for_backward(x)
        ctx.upper = (num_levels(bits) - 1) * step
        return quantize_codes(x, step, eps, bits).to(x.dtype).mul_(step)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        return _straight_through_grad(grad_out, x, ctx.upper), None, None, None


def _inner_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b): one dot product in memory order when a and b share a dense layout (half the
    time of a product and a sum on ResNet-20's channels-last maps), else the product and sum."""
    if a.stride() == b.stride() and (
        a.is_contiguous() or a.is_contiguous(memory_format=torch.channels_last)
    ):
        return torch.dot(_dense_view(a)[0].reshape(-1), _dense_view(b)[0].reshape(-1))
    return a.mul(b).sum()


def sparse_quantize(x: torch.Tensor, step: float, eps: float, bits: int) -> torch.Tensor:
    """Q(x) with the straight-through gradient of the spec."""
    return _SparseQuantizeSTE.apply(x, float(step), float(eps), int(bits))


class _SparseQuantizeLearnedStep(torch.autograd.Function):
    """Q(x) with a trainable step d (beyond the paper): x's gradient as in _SparseQuantizeSTE;
    d's is LSQ's (Esser et al., ICLR 2020) for these bins, dQ/dd = code - x/d on 0 < x < upper,
    2^bits - 1 above it, 0 at or below 0, times ``grad_scale``. eps stays where it is."""

    @staticmethod
    def forward(ctx, x, step, eps, bits, grad_scale):
        d = float(step)
        codes = quantize_codes(x, d, eps, bits)
        ctx.save_for_backward(x, codes)
        ctx.step, ctx.top, ctx.grad_scale = d, num_levels(bits) - 1, grad_scale
        return codes.to(x.dtype).mul_(d)

    @staticmethod
    def backward(ctx, grad_out):
        x, codes = ctx.saved_tensors
        grad_x = _straight_through_grad(grad_out, x, ctx.top * ctx.step)
        # sum(g * slope) without masks: code is 0 at or below 0 and 2^bits - 1 above upper, and
        # grad_x is g inside (0, upper), 0 elsewhere, so it is sum(g * code) - sum(grad_x * x) / d
        # (a float copy of the codes and float32 sums: mixed-dtype products and float64 sums
        # took 10x as long on channels-last maps)
        by_code = _inner_product(grad_out, codes.to(grad_out.dtype))
        by_input = _inner_product(grad_x, x)
        grad_step = (by_code - by_input / ctx.step) * ctx.grad_scale
        return grad_x, grad_step.to(torch.float32), None, None, None


def sparse_quantize_learned_step(
    x: torch.Tensor, step: torch.Tensor, eps: float, bits: int
) -> torch.Tensor:
    """Q(x) with d a trainable scalar tensor; its gradient is scaled by 1/sqrt(numel * (2^bits
    - 1)) per sample, as LSQ's, so that steps move at the pace of the weights."""
    grad_scale = 1.0 / math.sqrt(x[0].numel() * (num_levels(bits) - 1))
    return _SparseQuantizeLearnedStep.apply(x, step, float(eps), int(bits), grad_scale)


# --- design: MSE-optimal step for x ~ N(0, 1) -------------------------------------------------


def _phi(x: float) -> float:
    return math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi) if math.isfinite(x) else 0.0


def _Phi(x: float) -> float:
    return _STANDARD_NORMAL.cdf(x) if math.isfinite(x) else (1.0 if x > 0 else 0.0)


def _gaussian_bin_error(q: float, a: float, b: float) -> float:
    """Integral over (a, b] of (q - x)^2 phi(x) dx, from the Gaussian partial moments."""
    mass = _Phi(b) - _Phi(a)
    first = _phi(a) - _phi(b)  # integral of x phi(x)
    a_term = a * _phi(a) if math.isfinite(a) else 0.0
    b_term = b * _phi(b) if math.isfinite(b) else 0.0
    second = mass + a_term - b_term  # integral of x^2 phi(x)
    return q * q * mass - 2 * q * first + second


def gaussian_mse(step: float, eps: float, bits: int) -> float:
    """E[(Q(x) - relu(x))^2] for x ~ N(0, 1) (the design criterion of the spec)."""
    edges = [eps, *[(k + 0.5) * step for k in range(1, num_levels(bits) - 1)], math.inf]
    error = _gaussian_bin_error(0.0, 0.0, eps)  # (0, eps] -> 0 while relu(x) = x
    for k in range(1, num_levels(bits)):
        error += _gaussian_bin_error(k * step, edges[k - 1], edges[k])
    return error


def _golden_section(f, lo: float, hi: float, tol: float = 1e-10) -> float:
    ratio = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = f(d)
    return (a + b) / 2


def _minimise_on_grid_then_refine(f, lo: float, hi: float, points: int = 400) -> float:
    """Global grid search followed by golden section around the best grid point."""
    grid = [lo + (hi - lo) * i / (points - 1) for i in range(points)]
    values = [f(g) for g in grid]
    best = min(range(points), key=values.__getitem__)
    left, right = grid[max(best - 1, 0)], grid[min(best + 1, points - 1)]
    return _golden_section(f, left, right)


def gaussian_optimal_step(bits: int, eps: float) -> float:
    """MSE-optimal d for x ~ N(0,1) given eps. 2 bits: eps=0 -> 0.5388, eps=0.32 -> 0.6487."""
    _check_bits(bits)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}: use e.g. eps=0.32")
    lo = max(eps / 1.5, 1e-3) * 1.0000001 if bits >= 2 else 1e-3
    hi = max(4.0, 2 * lo)
    return _minimise_on_grid_then_refine(lambda d: gaussian_mse(d, eps, bits), lo, hi)


def eps_for_sparsity(sparsity: float) -> float:
    """eps such that the fraction of zeros under N(0,1) is Phi(eps) = sparsity (>= 0.5)."""
    if not 0.5 <= sparsity < 1:
        raise ValueError(
            f"target sparsity must be in [0.5, 1) (eps >= 0 already zeroes half of N(0,1)), got {sparsity!r}"
        )
    return max(0.0, _STANDARD_NORMAL.inv_cdf(sparsity))


# --- design: data-driven fit --------------------------------------------------------------------


def empirical_mse(x: torch.Tensor, step: float, eps: float, bits: int) -> float:
    q = codes_to_values(quantize_codes(x, step, eps, bits), step, torch.float64)
    return float(torch.mean((q - torch.relu(x.double())) ** 2))


def fit_step(
    samples: torch.Tensor, bits: int, eps: float, fit_eps: bool = False, max_samples: int = 200_000
) -> tuple[float, float]:
    """Fit d (and optionally eps) minimising the empirical E[(Q(x) - relu(x))^2].

    Returns (step, eps). With ``fit_eps`` eps is searched jointly, so the result trades
    sparsity for error freely; keep it False to hold the sparsity the user chose.
    """
    x = samples.detach().flatten().double()
    if x.numel() == 0 or not torch.isfinite(x).all():
        raise ValueError("cannot fit the quantizer: samples are empty or contain NaN/Inf")
    if x.numel() > max_samples:
        x = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))[:max_samples]]
    positive = x[x > 0]
    hi = float(positive.max()) if positive.numel() else 1.0

    def best_step(e: float) -> float:
        lo = max(e / 1.5, hi * 1e-4) * 1.0000001 if bits >= 2 else hi * 1e-4
        return _minimise_on_grid_then_refine(
            lambda d: empirical_mse(x, d, e, bits), lo, max(hi, 2 * lo), points=200
        )

    if not fit_eps:
        return best_step(eps), eps
    candidates = [hi * i / 200 for i in range(0, 60)]
    fits = [(empirical_mse(x, d, e, bits), d, e) for e in candidates for d in [best_step(e)]]
    _, step, eps = min(fits)
    return step, eps


# --- module -------------------------------------------------------------------------------------


class QParamsModule(nn.Module):
    """A quantizer whose design lives in a float64 ``qparams`` buffer, bits first, so state
    dicts carry it; ``model.float()`` or ``.half()`` moves the buffer but never rounds it."""

    def _apply(self, fn, recurse=True):
        saved = self.qparams
        super()._apply(fn, recurse)
        self._buffers["qparams"] = saved.to(device=self.qparams.device)
        return self

    @property
    def bits(self) -> int:
        return int(self.qparams[0])


class SparseQuantizer(QParamsModule):
    """Q of the spec as a module: ``q(x)`` quantizes (STE backward), ``q.codes(x)`` gives codes.

    Build it with :meth:`from_gaussian` (design for N(0,1) pre-activations, the default after a
    non-affine BN) or :meth:`from_data` (fit to observed pre-activations).
    """

    def __init__(self, bits: int = 2, eps: float = 0.32, step: float | None = None):
        super().__init__()
        _check_bits(bits)
        step = gaussian_optimal_step(bits, eps) if step is None else float(step)
        _check_eps_step(float(eps), step, bits)
        # A float64 buffer so checkpoints (safetensors state dicts) carry the design per layer.
        self.register_buffer("qparams", torch.tensor([bits, eps, step], dtype=torch.float64))

    @property
    def eps(self) -> float:
        return float(self.qparams[1])

    @property
    def step(self) -> float:
        if "learned_step" in self._parameters:  # as the forward uses it
            return max(float(self.learned_step.detach()), self.min_step)
        return float(self.qparams[2])

    @property
    def min_step(self) -> float:
        """The smallest step a learned d may take: level 1 stays non-empty (eps < 1.5 d)."""
        return max(self.eps / 1.5 * 1.01, 1e-3)

    def learn_step(self) -> SparseQuantizer:
        """Beyond the paper: make d a trainable parameter (``learned_step``, LSQ's gradient) for
        step-1 training; :meth:`freeze_step` writes it back into the design. eps is kept, so
        the sparsity Phi(eps) of the spec's Gaussian design is kept too."""
        step = torch.tensor(self.step, dtype=torch.float32, device=self.qparams.device)
        self.learned_step = nn.Parameter(step)
        return self

    def freeze_step(self) -> SparseQuantizer:
        """End :meth:`learn_step`: the learned d becomes the quantizer's fixed step."""
        if "learned_step" in self._parameters:
            step = self.step
            del self._parameters["learned_step"]
            _check_eps_step(self.eps, step, self.bits)
            self.qparams[2] = step
        return self

    @classmethod
    def from_gaussian(
        cls, bits: int = 2, eps: float | None = None, sparsity: float | None = None
    ) -> SparseQuantizer:
        if eps is not None and sparsity is not None:
            raise ValueError("give either eps or sparsity, not both")
        if eps is None:
            eps = eps_for_sparsity(sparsity) if sparsity is not None else 0.32
        return cls(bits=bits, eps=eps, step=gaussian_optimal_step(bits, eps))

    @classmethod
    def from_data(
        cls, samples: torch.Tensor, bits: int = 2, eps: float = 0.32, fit_eps: bool = False
    ) -> SparseQuantizer:
        step, eps = fit_step(samples, bits, eps, fit_eps=fit_eps)
        return cls(bits=bits, eps=eps, step=step)

    @property
    def sparsity(self) -> float:
        """Expected fraction of zeros for N(0, 1) inputs: Phi(eps)."""
        return _Phi(self.eps)

    @property
    def num_levels(self) -> int:
        return num_levels(self.bits)

    @property
    def max_value(self) -> float:
        return (self.num_levels - 1) * self.step

    def thresholds(self) -> torch.Tensor:
        return thresholds(self.step, self.eps, self.bits)

    def levels(self) -> torch.Tensor:
        return levels(self.step, self.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "learned_step" in self._parameters:
            with torch.no_grad():  # an optimizer step may have pushed d below eps / 1.5
                self.learned_step.clamp_(min=self.min_step)
            return sparse_quantize_learned_step(x, self.learned_step, self.eps, self.bits)
        return sparse_quantize(x, self.step, self.eps, self.bits)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        return quantize_codes(x, self.step, self.eps, self.bits)

    def decode(self, codes: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        return codes_to_values(codes, self.step, dtype)

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        return values_to_codes(values, self.step, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, eps={self.eps:.4g}, step={self.step:.4g}, sparsity={self.sparsity:.3f}"
