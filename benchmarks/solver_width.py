"""How step 2's time grows with a layer's input width: one synthetic coded layer per width.

    python benchmarks/solver_width.py --threads 2 --rows 16384 --widths 576 1152 2304 4608

Each problem has the shape of a 3x3 conv of VGG-Small (n = 9 C_in inputs, c output channels,
ternary weights), inputs that are sparse 2-bit codes (as a quantized layer sees them) and
targets that a planted ternary layer produces; the solver starts from the planted weights plus
noise, like a step-1 model. Per width it times the Gram-building pass that any least-squares
method over these rows pays (X'X in float64, block by block), the step-2 solve, and the solver's
coordinate-descent sweep with the naive per-coordinate update (``block=1``) for comparison.
Rows go to benchmarks/solver_width.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from tsquant import SolverConfig, SparseQuantizer, solve_layer
from tsquant.quantizers.weight import WeightGrid
from tsquant.solver import coordinate_descent_wstep, gram

QUANTIZER = SparseQuantizer.from_gaussian(bits=2, eps=0.32)


def problem(n: int, c: int, rows: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = QUANTIZER(torch.randn(rows, n, generator=gen))  # sparse 2-bit codes, as a layer sees
    w = torch.randint(-1, 2, (c, n), generator=gen).float()
    s = x @ w.T
    alpha, bias = 1 / s.std(0), -s.mean(0) / s.std(0)
    y = QUANTIZER(s * alpha + bias)
    init = (w + 0.5 * torch.randn(w.shape, generator=gen)) * alpha[:, None]
    return x, y, init, bias


def measure(n: int, c: int, rows: int, iters: int) -> dict:
    x, y, init, bias = problem(n, c, rows)
    start = time.perf_counter()
    a = gram(x).gram
    gram_s = time.perf_counter() - start
    sol = solve_layer(x, y, QUANTIZER, init=init, bias=bias, config=SolverConfig(iters=iters))
    # one coordinate-descent sweep, blocked (the solver's) and per coordinate (the naive form)
    grid = WeightGrid.from_spec("ternary")
    b = torch.randn(n, c, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 30
    sweeps = {}
    for block in (128, 1):
        w0 = torch.randint(-1, 2, (n, c), generator=torch.Generator().manual_seed(2)).double()
        start = time.perf_counter()
        coordinate_descent_wstep(a, b, w0, torch.ones(c, dtype=torch.float64), grid, 1, block)
        sweeps[block] = time.perf_counter() - start
    return {
        "inputs": n,
        "channels": c,
        "rows": rows,
        "gram_s": round(gram_s, 2),
        "tsq_s": round(sol.seconds, 2),
        "tsq_over_gram": round(sol.seconds / gram_s, 2),
        "alternations": len(sol.history) - 1,
        "agreement": round(sol.agreement, 4),
        "sweep_blocked_s": round(sweeps[128], 2),
        "sweep_per_coordinate_s": round(sweeps[1], 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[576, 1152, 2304, 4608])
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default=str(Path(__file__).with_name("solver_width.json")))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python benchmarks/solver_width.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    rows = []
    for n in args.widths:
        c = max(64, n // 9)  # VGG-Small: C_out = C_in (128/256/512), n = 9 C_in
        row = measure(n, c, args.rows, args.iters)
        row |= {
            "threads": args.threads,
            "date": datetime.date.today().isoformat(),
            "command": command,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
