"""Planted step-2 problem: paper vs tsquant solver variants.

X ~ N(0,1) (m x n), known ternary w* per channel, alpha* and bias* as a non-affine BN would
give them, targets y = Q(alpha* X w* + bias*). Prints code agreement, recovered fraction of w*
and time for each variant.   Usage: python benchmarks/planted.py [--m 20000 --n 144 --c 32]
"""

import argparse
import time

import torch

from tsquant import SolverConfig, SparseQuantizer, solve_layer


def planted(m: int, n: int, c: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, n, generator=gen)
    w = torch.randint(-1, 2, (c, n), generator=gen).float()
    raw = x @ w.T
    return x, w, 1 / raw.std(0), -raw.mean(0) / raw.std(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=20000)
    parser.add_argument("--n", type=int, default=144)
    parser.add_argument("--c", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    quantizer = SparseQuantizer.from_gaussian(bits=2, eps=0.32)
    x, w, alpha, bias = planted(args.m, args.n, args.c, args.seed)
    y = quantizer(x @ (w * alpha[:, None]).T + bias)
    print(f"planted problem m={args.m} n={args.n} c={args.c} seed={args.seed}")
    print("| variant | code agreement | w* recovered | time (s) |\n|---|---|---|---|")
    for variant in ("paper", "tsquant"):
        start = time.perf_counter()
        sol = solve_layer(x, y, quantizer, config=SolverConfig(variant=variant))
        recovered = float((sol.weight_codes.float() == w).float().mean())
        print(
            f"| {variant} | {sol.agreement:.4f} | {recovered:.4f} | {time.perf_counter() - start:.1f} |"
        )


if __name__ == "__main__":
    main()
