"""The ``acnorm`` command: ``acnorm info`` and ``acnorm bench``."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from . import __version__, benchmark, benchmark_network
from .backends import available_backends, cuda_extension_status, resolve_backend


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
    print(f"numpy        {_module_version('numpy')}")
    print(f"backends     {', '.join(available_backends())}")
    if cuda:
        for index in range(torch.cuda.device_count()):
            print(f"device       cuda:{index} {torch.cuda.get_device_name(index)}")
        probe = torch.empty(0, device="cuda")
    else:
        print(f"device       cpu ({torch.get_num_threads()} threads), no CUDA device")
        probe = torch.empty(0)
    print(f"auto picks   {resolve_backend('auto', probe, 'acnorm info')}")
    return 0


TABLE_DTYPES = ("float32", "bfloat16")
TABLE_LAYOUTS = ("contiguous", "channels_last")


def _parse_shape(text: str) -> benchmark.Shape:
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) != 5 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"a shape is NxCxDxHxW with positive sizes, got {text!r}")
    n, _c, *spatial = parts
    if n * spatial[0] * spatial[1] * spatial[2] < 2:
        raise argparse.ArgumentTypeError(
            f"{text}: a training step needs more than one value per channel (N * D * H * W > 1)")
    return tuple(parts)  # type: ignore[return-value]


def _bench_device(text: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` naming a GPU of this machine."""
    if text == "auto":
        return text
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: the benchmarks run on cpu or cuda devices")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device is available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


def _out_folder(text: str) -> Path:
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a folder")
    return path


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def _write_tables(folder: Path, stem: str, markdown: str, json_text: str, quiet: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.md").write_text(markdown)
    (folder / f"{stem}.json").write_text(json_text)
    if not quiet:
        print(f"acnorm bench: wrote {folder / (stem + '.md')} and {folder / (stem + '.json')}", file=sys.stderr)


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the benchmark table and optionally write it as Markdown and JSON."""
    if args.what == "network":
        others = [flag for flag, given in (("--shapes", args.shapes), ("--audit", args.audit),
                                           ("--host-profile", args.host_profile),
                                           ("--sync-processes", args.sync_processes is not None)) if given]
        if others:
            print(f"acnorm bench network: {', '.join(others)} belong(s) to the per-layer table", file=sys.stderr)
            return 2
    elif args.networks or args.modes:
        print("acnorm bench: --networks and --modes belong to `acnorm bench network`", file=sys.stderr)
        return 2
    if args.audit:
        return _bench_audit(args)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            print("acnorm bench: --device cuda asked for, but no CUDA device is available", file=sys.stderr)
            return 2
    if args.what == "network":
        return _bench_network(args, device)
    dtypes = args.dtypes or TABLE_DTYPES
    layouts = args.layouts or TABLE_LAYOUTS
    if args.shapes:
        cases = [
            benchmark.Case(shape, dtype, layout)
            for shape in args.shapes
            for dtype in dtypes
            for layout in layouts
        ]
    else:
        cases = [
            c for c in benchmark.default_cases(device)
            if c.dtype in dtypes and c.layout in layouts
        ]
    machine = benchmark.machine_description(device)
    if device.type == "cpu" and not args.system_malloc and benchmark.reuse_freed_memory():
        machine += ", freed memory reused (glibc mallopt)"
    if args.sync_processes is not None:
        return _bench_sync(args, cases, device, machine)
    if args.host_profile:
        return _bench_host(args, cases, device, machine)
    print(f"acnorm bench: {len(cases)} cases on {machine}", file=sys.stderr)

    def write_partial(results: list[benchmark.Result]) -> None:
        # Rewritten after every case: a run stopped by a time limit keeps its finished rows.
        if args.out is not None and len(results) < len(cases):
            _write_tables(args.out, "bench", benchmark.to_markdown(results, machine),
                          benchmark.to_json(results, machine), quiet=True)

    results = benchmark.run(
        cases, device, repeats=args.repeats, warmup=args.warmup,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
        compile_reference=not args.no_compile, on_result=write_partial,
    )
    table = benchmark.to_markdown(results, machine)
    print(table)
    if args.out is not None:
        _write_tables(args.out, "bench", table, benchmark.to_json(results, machine))
        if benchmark.write_plot(results, args.out / "bench.png"):
            print(f"acnorm bench: wrote {args.out / 'bench.png'}", file=sys.stderr)
        else:
            print("acnorm bench: no plot (matplotlib is not installed)", file=sys.stderr)
    return 0


def _bench_network(args: argparse.Namespace, device: torch.device) -> int:
    """The training step of whole networks: BatchNorm original, AC-Norm, the authors' formulation."""
    try:
        import monai  # noqa: F401
    except ImportError:
        print("acnorm bench network: the networks come from MONAI (pip install 'acnorm-fused[monai]')",
              file=sys.stderr)
        return 2
    rows = benchmark_network.default_rows(device, args.quick, args.networks, args.dtypes, args.layouts,
                                          args.modes)
    machine = benchmark.machine_description(device)
    print(f"acnorm bench network: {len(rows)} rows on {machine}{' (quick sizes)' if args.quick else ''}",
          file=sys.stderr)

    def write(results: list) -> None:
        # Rewritten after every row: a run stopped by a time limit keeps its finished rows.
        if args.out is not None:
            _write_tables(args.out, "bench-network", benchmark_network.to_markdown(results, machine, args.quick),
                          benchmark_network.to_json(results, machine, args.quick), quiet=True)

    results = benchmark_network.run(rows, device, args.quick, rounds=max(args.repeats // 4, 3),
                                    progress=lambda line: print(line, file=sys.stderr, flush=True), done=write)
    print(benchmark_network.to_markdown(results, machine, args.quick))
    if args.out is not None:
        written = ["bench-network.md", "bench-network.json"]
        if benchmark_network.write_plot(results, args.out / "bench-network.png"):
            written.append("bench-network.png")
        print(f"acnorm bench network: wrote {', '.join(str(args.out / name) for name in written)}",
              file=sys.stderr)
    return 0


def _bench_audit(args: argparse.Namespace) -> int:
    """The kernel audit: compiled-code facts and byte counts, no GPU needed.
    Exits 1 when it finds a regression."""
    from . import audit
    from .backends import cuda_extension

    if importlib.util.find_spec("triton") is None:
        print("acnorm bench --audit: needs triton (pip install 'acnorm-fused[triton]')", file=sys.stderr)
        return 2
    if reason := audit.traffic_unsupported():
        print(f"acnorm bench --audit: {reason}", file=sys.stderr)
        return 2
    module = cuda_extension()
    module_file = module.__file__ if module is not None and not module.emulated else None
    print(f"acnorm bench --audit: compiling the Triton kernels for "
          f"{', '.join(f'sm_{a}' for a in args.archs)}{' (quick set)' if args.quick else ''}", file=sys.stderr)
    report, raw, findings = audit.run_audit(args.archs, quick=args.quick, cuda_module=module_file)
    print(report)
    if args.out is not None:
        _write_tables(args.out, "audit", report, json.dumps(raw, indent=1))
    return 1 if findings else 0


def _archs(text: str) -> tuple[int, ...]:
    try:
        archs = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a comma-separated list of compute capabilities like 80,90; got {text!r}")
    if not archs or min(archs) < 50:
        raise argparse.ArgumentTypeError(f"compute capabilities like 80,90,100; got {text!r}")
    return archs


def _bench_sync(args: argparse.Namespace, cases: list, device: torch.device, machine: str) -> int:
    """The SyncACNorm table: gloo processes on this machine's CPU."""
    from . import benchmark_sync

    if device.type != "cpu":
        print("acnorm bench: --sync-processes runs gloo processes on the CPU; use --device cpu",
              file=sys.stderr)
        return 2
    threads = benchmark_sync.threads_per_process(args.sync_processes)
    machine += f"; {args.sync_processes} gloo processes of {threads} thread(s) each"
    print(f"acnorm bench: {len(cases)} cases on {machine}", file=sys.stderr)
    results = benchmark_sync.run_sync(
        cases, args.sync_processes, repeats=args.repeats, warmup=args.warmup,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
        reuse_memory=not args.system_malloc,
    )
    table = benchmark_sync.to_markdown(results, machine)
    print(table)
    if args.out is not None:
        _write_tables(args.out, "bench-sync", table, benchmark_sync.to_json(results, machine))
    return 0


def _bench_host(args: argparse.Namespace, cases: list, device: torch.device, machine: str) -> int:
    """Host time of the eager step against its GPU time, and where the host time goes;
    ``cases`` are the ones --shapes asked for, else this profile's own."""
    from . import benchmark_host

    if not args.shapes:
        cases = list(benchmark_host.GPU_CASES if device.type == "cuda" else benchmark_host.CPU_CASES)
    print(f"acnorm bench --host-profile: {len(cases)} cases on {machine}", file=sys.stderr)
    report = benchmark_host.run(cases, device, machine, repeats=max(args.repeats, 10),
                                progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(report)
    reports = {"host-profile.md": report}
    if device.type == "cpu":
        # What the step costs the host whatever the machine: counts, and wall
        # time with the cuda backend's launches doing nothing.
        cost = benchmark_host.cost_report(machine)
        print(f"host cost per eager step: {benchmark_host.COST_CASE.label()}", file=sys.stderr)
        print(cost)
        reports["host-cost.md"] = cost
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        for name, text in reports.items():
            (args.out / name).write_text(text)
            print(f"acnorm bench: wrote {args.out / name}", file=sys.stderr)
    return 0


def _at_least_two(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2, got {value}")
    return value


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

    bench = sub.add_parser(
        "bench", help="time forward+backward of the reference, acnorm and nn.BatchNorm3d "
                      "(bench network: whole networks' training steps)"
    )
    bench.add_argument(
        "what", nargs="?", choices=["table", "network"], default="table",
        help="table (default): the per-layer table; network: the training step of whole networks, "
             "BatchNorm original against converted to AC-Norm and to the authors' formulation",
    )
    bench.add_argument("--device", type=_bench_device, default="auto", help="auto (default), cpu, cuda or cuda:N")
    bench.add_argument(
        "--shapes", nargs="+", type=_parse_shape, metavar="NxCxDxHxW",
        help="shapes to run (default: the standard set for the device)",
    )
    bench.add_argument(
        "--dtypes", nargs="+", choices=["float32", "bfloat16", "float16"],
        help="default: float32 and bfloat16 (network --quick: float32)",
    )
    bench.add_argument(
        "--layouts", nargs="+", choices=list(TABLE_LAYOUTS), help="default: both",
    )
    bench.add_argument(
        "--networks", nargs="+", choices=list(benchmark_network.NETWORKS),
        help="network: the networks to run (default: all; on a GPU a set of rows sized to about 3 minutes)",
    )
    bench.add_argument(
        "--modes", nargs="+", choices=list(benchmark_network.MODES),
        help="network: eager steps (default), torch.compile, or torch.compile with CUDA graphs (GPU)",
    )
    bench.add_argument(
        "--repeats", type=_positive_int, default=20,
        help="CPU: timed steps per layer (median); CUDA: repeats // 5 rounds of 10 * repeats ms",
    )
    bench.add_argument("--warmup", type=_non_negative_int, default=3, help="CPU: untimed steps per layer first")
    bench.add_argument(
        "--no-compile", action="store_true", help="CUDA: leave out torch.compile of the reference",
    )
    bench.add_argument(
        "--sync-processes", type=_at_least_two, metavar="N",
        help="instead: time SyncACNorm against ACNorm and BatchNorm in N gloo processes on the CPU",
    )
    bench.add_argument(
        "--audit", action="store_true",
        help="instead: the kernel audit (Triton kernels compiled for GPU targets, registers, spills, load "
             "widths; bytes per fused op under the interpreter; the CUDA module's kernels); no GPU needed",
    )
    bench.add_argument(
        "--host-profile", action="store_true",
        help="instead: the eager step's host time against its wall and CUDA-graph time, and the Python "
             "functions and operators it goes to (--shapes, --dtypes and --layouts pick the cases); on a CPU "
             "also the Python calls, aten ops, new storages and wall time of one step against BatchNorm3d, "
             "the cuda backend's launches doing nothing (host-cost.md)",
    )
    bench.add_argument("--archs", type=_archs, default=(80, 90, 100), help="--audit: targets, e.g. 80,90,100")
    bench.add_argument("--quick", action="store_true",
                       help="--audit: one launch set per kernel family; network: CPU sizes (a smoke test)")
    bench.add_argument("--out", type=_out_folder, help="folder to write bench.md and bench.json (or audit.*, host-profile.md) into")
    bench.add_argument(
        "--system-malloc", action="store_true",
        help="on CPU, keep glibc's default of unmapping large freed blocks (noisier timings)",
    )
    bench.set_defaults(func=cmd_bench)

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
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
