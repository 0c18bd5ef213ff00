"""`tsquant` command line: one sub-command per stage, plus `run` for all stages not yet done.

The CLI only parses and calls the pipeline; errors are one line (``--debug`` for a traceback).
"""

from __future__ import annotations

import argparse
import sys

from .distributed import shutdown
from .pipeline.config import ConfigError, load_config, option_table

STAGE_HELP = {
    "train": "train the full-precision model (or load --set init_checkpoint=...)",
    "codes": "step 1: train with sparse low-bit activations from the FP checkpoint",
    "transform": "step 2: learn low-bit weights layer by layer (no SGD)",
    "finetune": "optional short STE fine-tune of the quantized model",
    "eval": "evaluate every finished stage on the test set and print the table",
    "export": "write the integer model (packed codes), ONNX and model card; verify them",
    "report": "write the Markdown report with plots",
    "run": "run all stages that are not done yet (an interrupted stage resumes)",
}


def _options_epilog() -> str:
    rows = option_table()
    width = max(len(name) for name, _, _ in rows)
    lines = ["configuration options (YAML keys, or --set KEY=VALUE; defaults shown):"]
    for name, default, help_text in rows:
        lines.append(f"  {name:<{width}}  {help_text} [default: {default}]")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tsquant",
        description="Two-Step Quantization: ternary/low-bit weights and sparse 2-bit activations.",
        epilog=_options_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in STAGE_HELP.items():
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=_options_epilog(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument(
            "config", nargs="?", help="YAML config file (see configs/); defaults if omitted"
        )
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config option, e.g. --set codes.eps=0.5 (repeatable)",
        )
        p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    return parser


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects KEY=VALUE, got {pair!r}: e.g. --set train.epochs=2")
        key, value = pair.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from .version import __version__

        print(f"tsquant {__version__}")
        return 0
    if args.command is None:
        parser.print_help()
        return 0
    try:
        cfg = load_config(args.config, parse_overrides(args.set))
        from .pipeline.stages import run_all, run_stage

        if args.command == "run":
            run_all(cfg)
        else:
            run_stage(cfg, args.command)
        shutdown()
    except KeyboardInterrupt:
        shutdown()
        print("tsquant: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # one line for the user, the traceback with --debug
        if args.debug or not isinstance(exc, ValueError | FileNotFoundError | RuntimeError):
            raise
        print(f"tsquant: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
