"""`clippy-ray` command line. Subcommands build config dataclasses and call one function each."""

from __future__ import annotations

import argparse
import sys

from clippy_ray import __version__


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. model.aggregation=avg loss.chunk_size=4096")


def cmd_version(args: argparse.Namespace) -> int:
    print(f"clippy-ray {__version__}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from clippy_ray import config

    print(config.dump(config.load(args.config, args.overrides)), end="")
    return 0


def cmd_model(args: argparse.Namespace) -> int:
    import torch

    from clippy_ray import config
    from clippy_ray.model import build_model
    from clippy_ray.tokenizer import build_tokenizer

    cfg = config.load(args.config, args.overrides)
    tokenizer = build_tokenizer(cfg.model.text)
    model = build_model(cfg.model, tokenizer.vocab_size).eval()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    size = cfg.model.image.img_size
    with torch.no_grad():
        grid = model.dense_features(torch.zeros(1, 3, size, size)).shape[1:3]
    print(f"image tower  {cfg.model.image.name}: {count(model.image) / 1e6:.2f}M parameters, "
          f"{size}px -> {grid[0]}x{grid[1]} feature map, aggregation={cfg.model.aggregation}")
    print(f"text tower   {model.text.encoder.config.model_type}: {count(model.text) / 1e6:.2f}M parameters, "
          f"tokenizer {cfg.model.text.tokenizer!r} ({tokenizer.vocab_size} tokens)")
    print(f"total        {count(model) / 1e6:.2f}M parameters, embedding dim {cfg.model.embed_dim}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clippy-ray",
        description="Train and evaluate CLIPpy (perceptual grouping in contrastive vision-language models) "
                    "on Ray + DeepSpeed.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("version", help="print the version").set_defaults(func=cmd_version)
    p = sub.add_parser("config", help="print the resolved config (YAML + overrides, validated)")
    _add_config_args(p)
    p.set_defaults(func=cmd_config)
    p = sub.add_parser("model", help="build the model a config describes and print its size")
    _add_config_args(p)
    p.set_defaults(func=cmd_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from clippy_ray.config import ConfigError
    from clippy_ray.storage import StorageError

    try:
        return args.func(args)
    except (ConfigError, StorageError, ValueError, FileNotFoundError) as err:
        print(f"clippy-ray: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
