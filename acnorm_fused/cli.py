"""The ``acnorm`` command: ``info``, ``rank`` and ``demo``, and the tooling's ``bench`` and ``audit``."""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from . import __version__
from .backends import available_backends, cuda_extension, cuda_extension_status, resolve_backend
from .bench import commands
from .correlation import compiled_windows_status


def _module_version(name: str) -> str:
    try:
        return getattr(importlib.import_module(name), "__version__", "installed")
    except ImportError:
        return "not installed"


def cmd_info(_args: argparse.Namespace) -> int:
    """Print versions, backends and devices."""
    cuda = torch.cuda.is_available()
    print(f"acnorm_fused {__version__}")
    print(f"python       {platform.python_version()} ({platform.platform()})")
    print(f"torch        {torch.__version__} (CUDA build: {torch.version.cuda or 'none'})")
    print(f"triton       {_module_version('triton')}")
    print(f"cuda kernels {cuda_extension_status()}")
    print(f"cpu windows  {compiled_windows_status()}")
    print(f"numpy        {_module_version('numpy')}")
    print(f"backends     {', '.join(available_backends())}")
    if cuda:
        from .backends.cuda import capacity_summary

        module = cuda_extension()
        for index in range(torch.cuda.device_count()):
            print(f"device       cuda:{index} {torch.cuda.get_device_name(index)}")
            if module is not None:
                packs = " | ".join(map(str, module.RESIDENT_PACKS))
                print(f"single pass  cuda:{index} holds blocks (forward/backward at {packs} packs per lane): "
                      f"{capacity_summary(module, index)}")
        probe = torch.empty(0, device="cuda")
    else:
        print(f"device       cpu ({torch.get_num_threads()} threads), no CUDA device")
        probe = torch.empty(0)
    print(f"auto picks   {resolve_backend('auto', probe, 'acnorm info')}")
    return 0


def cmd_rank(args: argparse.Namespace) -> int:
    """Rank pretrained models by AC-Corr from (pretrained, short-finetuned) checkpoint pairs."""
    from . import transferability

    names = [name for name, _, _ in args.candidate]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        print(f"acnorm rank: candidate names must differ; repeated: {', '.join(duplicates)}", file=sys.stderr)
        return 2
    pairs = {name: (pretrained, finetuned) for name, pretrained, finetuned in args.candidate}
    try:
        ranking = transferability.rank_checkpoints(pairs, args.layers, ascending=args.ascending)
    except (OSError, ValueError) as error:
        print(f"acnorm rank: {error}", file=sys.stderr)
        return 2
    print(transferability.to_json(ranking) if args.json else transferability.to_text(ranking), end="")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The finetuning study: does AC-Norm help on real brain MRI?"""
    from .demo.data import MissingData
    from .demo.study import run_study

    try:
        report = run_study(args.out, smoke=args.smoke)
    except MissingData as error:
        print(f"acnorm demo: {error}", file=sys.stderr)
        return 2
    print(report)
    print(f"acnorm demo: wrote {args.out / 'demo.md'}, demo.json, demo.png and demo-zoo.png", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="acnorm", description="Fused AC-Norm for PyTorch.")
    parser.add_argument("--version", action="version", version=f"acnorm_fused {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="versions, available backends and devices")
    info.set_defaults(func=cmd_info)

    commands.add_bench_parser(sub)
    commands.add_audit_parser(sub)

    demo = sub.add_parser(
        "demo", help="finetuning study on real brain MRI: AC-Norm against vanilla, L2-SP and controls, "
        "and whether AC-Corr ranks a zoo of source models",
    )
    demo.add_argument("--smoke", action="store_true", help="a tiny run (well under a minute) that checks the pipeline")
    demo.add_argument("--out", type=Path, default=Path("demo-out"),
                      help="folder for the report, plots, raw runs and the cached source models (default demo-out)")
    demo.set_defaults(func=cmd_demo)

    rank = sub.add_parser(
        "rank", help="rank pretrained models by AC-Corr after a short AC-Norm finetuning of each",
        description="Score each candidate by AC-Corr between its pretrained BatchNorm checkpoint and "
        "the checkpoint of the same model after a short AC-Norm finetuning on the target task "
        "(one epoch, or a few hundred steps), and print them highest score first.",
    )
    rank.add_argument(
        "--candidate", nargs=3, action="append", required=True,
        metavar=("NAME", "PRETRAINED", "FINETUNED"), help="a candidate and its two checkpoint files; repeat",
    )
    rank.add_argument("--layers", nargs="+", metavar="PREFIX",
                      help="score only the AC-Norm layers whose names start with these (default: all)")
    rank.add_argument("--json", action="store_true", help="print JSON with the per-layer scores")
    rank.add_argument("--ascending", action="store_true", help="lowest score first")
    rank.set_defaults(func=cmd_rank)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``acnorm`` console script."""
    args = build_parser().parse_args(commands.with_default_bench_mode(sys.argv[1:] if argv is None else argv))
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
