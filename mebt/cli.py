"""The `mebt` command line. Each subcommand imports its machinery lazily so `mebt --help` is instant."""
from __future__ import annotations

import argparse
import sys

from mebt.config import UserError

BENCHMARKS = {
    "train-scaling": ("benchmarks.train_scaling", "training step time and activation memory vs tokens, MeBT vs full attention"),
    "generation": ("benchmarks.generation", "generation time, MeBT sampling vs autoregressive with KV cache"),
}


def cmd_train(args) -> None:
    from mebt.config import load_config
    from mebt.train import RunConfig, train

    cfg = load_config(RunConfig, args.config, args.overrides)
    train(cfg)


def cmd_convert_official(args) -> None:
    from mebt.convert import convert_official_file

    cfg = convert_official_file(args.checkpoint, args.out, n_head=args.n_head,
                                latent_shape=tuple(args.latent_shape) if args.latent_shape else None)
    print(f"wrote {args.out}: MeBT {cfg.n_layer} layers, width {cfg.n_embd}, {cfg.n_latent} latents, "
          f"grid {list(cfg.latent_shape)}, vocab {cfg.vocab_size}, numerics {cfg.numerics}")


def cmd_bench(args) -> None:
    import importlib

    module = importlib.import_module(BENCHMARKS[args.name][0])
    module.main(args.args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mebt", description="Train, sample and benchmark MeBT video models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train MeBT (single process, procedural code grids)",
                       description="Train MeBT from a YAML config with dotted overrides, e.g. "
                                   "`mebt train --config configs/tiny.yaml model.n_layer=4 train.steps=100`. "
                                   "A run directory holding a checkpoint is resumed automatically.")
    p.add_argument("--config", help="YAML config file (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("convert-official", help="import an official MeBT checkpoint",
                       description="Convert an official MeBT Lightning checkpoint (first_stage_model.* ignored) "
                                   "into a mebt model file with the official numerics.")
    p.add_argument("checkpoint", help="official MeBT checkpoint (.ckpt)")
    p.add_argument("out", help="output mebt model file (.pt)")
    p.add_argument("--n-head", type=int, default=16, help="attention heads (not stored in the checkpoint; paper: 16)")
    p.add_argument("--latent-shape", type=int, nargs=3, metavar=("T", "H", "W"),
                   help="code grid (default: block_size/256 x 16 x 16)")
    p.set_defaults(func=cmd_convert_official)

    p = sub.add_parser("bench", help="run a benchmark and print its table",
                       description="Benchmarks: " + "; ".join(f"{k}: {v[1]}" for k, v in BENCHMARKS.items())
                                   + ". Arguments after the name go to the benchmark (try `mebt bench NAME --help`).")
    p.add_argument("name", choices=sorted(BENCHMARKS))
    p.add_argument("args", nargs=argparse.REMAINDER, help="benchmark arguments")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"mebt: error: {e}", file=sys.stderr)
        return 2
    return 0


def console_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    console_main()
