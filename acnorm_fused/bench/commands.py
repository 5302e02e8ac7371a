"""The ``acnorm bench`` subcommands and ``acnorm audit``: their arguments and what they run.

``acnorm bench`` alone is the per-layer table (``acnorm bench table``); the
other modes are subcommands of their own (``network``, ``sync``, ``host``),
each with only the options that apply to it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from . import layer, network
from .cases import HOST_CPU_CASES, HOST_GPU_CASES, LAYOUTS, TABLE_DTYPES, Case, Shape, default_cases
from .output import write_tables
from .timing import machine_description, reuse_freed_memory

BENCH_MODES = ("table", "network", "sync", "host")
DTYPES = ("float32", "bfloat16", "float16")


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _parse_shape(text: str) -> Shape:
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
    return (parts[0], parts[1], parts[2], parts[3], parts[4])


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


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"  # what argparse names in its "invalid ..." message
    return parse


def _archs(text: str) -> tuple[int, ...]:
    try:
        archs = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a comma-separated list of compute capabilities like 80,90; got {text!r}") from None
    if not archs or min(archs) < 50:
        raise argparse.ArgumentTypeError(f"compute capabilities like 80,90,100; got {text!r}")
    return archs


def _device(args: argparse.Namespace) -> torch.device:
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(args.device)


def _cases(args: argparse.Namespace, default: Sequence[Case]) -> list[Case]:
    """The cases ``--shapes``, ``--dtypes`` and ``--layouts`` ask for; without
    ``--shapes``, those of ``default`` with the dtypes and layouts asked for."""
    dtypes = args.dtypes or TABLE_DTYPES
    layouts = args.layouts or LAYOUTS
    if args.shapes:
        return [Case(shape, dtype, layout) for shape in args.shapes for dtype in dtypes for layout in layouts]
    return [case for case in default if case.dtype in dtypes and case.layout in layouts]


def _machine(device: torch.device, system_malloc: bool) -> str:
    machine = machine_description(device)
    if device.type == "cpu" and not system_malloc and reuse_freed_memory():
        machine += ", freed memory reused (glibc mallopt)"
    return machine


def run_table(args: argparse.Namespace) -> int:
    """The per-layer table, printed and optionally written as Markdown, JSON and PNG."""
    device = _device(args)
    cases = _cases(args, default_cases(device))
    machine = _machine(device, args.system_malloc)
    print(f"acnorm bench: {len(cases)} cases on {machine}", file=sys.stderr)

    def write_partial(results: list[layer.Result]) -> None:
        # Rewritten after every case: a run stopped by a time limit keeps its finished rows.
        if args.out is not None and len(results) < len(cases):
            write_tables(args.out, "bench", layer.to_markdown(results, machine), layer.to_json(results, machine))

    results = layer.run(cases, device, repeats=args.repeats, warmup=args.warmup, progress=_progress,
                        compile_reference=not args.no_compile, on_result=write_partial)
    table = layer.to_markdown(results, machine)
    print(table)
    if args.out is not None:
        write_tables(args.out, "bench", table, layer.to_json(results, machine), announce="acnorm bench")
        if layer.write_plot(results, args.out / "bench.png"):
            print(f"acnorm bench: wrote {args.out / 'bench.png'}", file=sys.stderr)
        else:
            print("acnorm bench: no plot (matplotlib is not installed)", file=sys.stderr)
    return 0


def run_network(args: argparse.Namespace) -> int:
    """The training step of whole networks: BatchNorm original, AC-Norm, the authors' formulation."""
    if importlib.util.find_spec("monai") is None:
        print("acnorm bench network: the networks come from MONAI (pip install 'acnorm-fused[monai]')",
              file=sys.stderr)
        return 2
    device = _device(args)
    rows = network.default_rows(device, args.quick, args.networks, args.dtypes, args.layouts, args.modes)
    machine = machine_description(device)
    print(f"acnorm bench network: {len(rows)} rows on {machine}{' (quick sizes)' if args.quick else ''}",
          file=sys.stderr)

    def write(results: list[network.RowResult]) -> None:
        # Rewritten after every row: a run stopped by a time limit keeps its finished rows.
        if args.out is not None:
            write_tables(args.out, "bench-network", network.to_markdown(results, machine, args.quick),
                         network.to_json(results, machine, args.quick))

    results = network.run(rows, device, args.quick, rounds=max(args.repeats // 4, 3), progress=_progress,
                          done=write)
    print(network.to_markdown(results, machine, args.quick))
    if args.out is not None:
        written = ["bench-network.md", "bench-network.json"]
        if network.write_plot(results, args.out / "bench-network.png"):
            written.append("bench-network.png")
        print(f"acnorm bench network: wrote {', '.join(str(args.out / name) for name in written)}",
              file=sys.stderr)
    return 0


def run_sync(args: argparse.Namespace) -> int:
    """The SyncACNorm table: gloo processes on this machine's CPU."""
    from . import sync

    cases = _cases(args, default_cases(torch.device("cpu")))
    threads = sync.threads_per_process(args.processes)
    machine = _machine(torch.device("cpu"), args.system_malloc)
    machine += f"; {args.processes} gloo processes of {threads} thread(s) each"
    print(f"acnorm bench sync: {len(cases)} cases on {machine}", file=sys.stderr)
    results = sync.run_sync(cases, args.processes, repeats=args.repeats, warmup=args.warmup, progress=_progress,
                            reuse_memory=not args.system_malloc)
    table = sync.to_markdown(results, machine)
    print(table)
    if args.out is not None:
        write_tables(args.out, "bench-sync", table, sync.to_json(results, machine), announce="acnorm bench sync")
    return 0


def run_host(args: argparse.Namespace) -> int:
    """Host time of the eager step against its GPU time, and where the host time goes."""
    from . import host

    device = _device(args)
    cases = _cases(args, HOST_GPU_CASES if device.type == "cuda" else HOST_CPU_CASES)
    machine = _machine(device, args.system_malloc)
    print(f"acnorm bench host: {len(cases)} cases on {machine}", file=sys.stderr)
    report = host.run(cases, device, machine, repeats=args.repeats, progress=_progress)
    print(report)
    reports = {"host-profile.md": report}
    if device.type == "cpu":
        # What the step costs the host whatever the machine: counts, and wall
        # time with the cuda backend's launches doing nothing.
        cost = host.cost_report(machine)
        print(f"host cost per eager step: {host.COST_CASE.label()}", file=sys.stderr)
        print(cost)
        reports["host-cost.md"] = cost
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        for name, text in reports.items():
            (args.out / name).write_text(text)
            print(f"acnorm bench host: wrote {args.out / name}", file=sys.stderr)
    return 0


def run_audit(args: argparse.Namespace) -> int:
    """The kernel audit: compiled-code facts and byte counts, no GPU needed.
    Exits 1 when it finds a regression."""
    from ..backends import cuda_extension
    from . import audit

    if importlib.util.find_spec("triton") is None:
        print("acnorm audit: needs triton (pip install 'acnorm-fused[triton]')", file=sys.stderr)
        return 2
    if reason := audit.traffic_unsupported():
        print(f"acnorm audit: {reason}", file=sys.stderr)
        return 2
    module = cuda_extension()
    module_file = module.__file__ if module is not None and not module.emulated else None
    print(f"acnorm audit: compiling the Triton kernels for {', '.join(f'sm_{a}' for a in args.archs)}"
          f"{' (quick set)' if args.quick else ''}", file=sys.stderr)
    report, raw, findings = audit.run_audit(args.archs, quick=args.quick, cuda_module=module_file)
    print(report)
    if args.out is not None:
        write_tables(args.out, "audit", report, json.dumps(raw, indent=1), announce="acnorm audit")
    return 1 if findings else 0


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", type=_bench_device, default="auto", help="auto (default), cpu, cuda or cuda:N")


def _add_case_options(parser: argparse.ArgumentParser, shapes_default: str) -> None:
    parser.add_argument("--shapes", nargs="+", type=_parse_shape, metavar="NxCxDxHxW",
                        help=f"shapes to run (default: {shapes_default})")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, help="default: float32 and bfloat16")
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, help="default: both")


def _add_out(parser: argparse.ArgumentParser, files: str) -> None:
    parser.add_argument("--out", type=_out_folder, help=f"folder to write {files} into")


def _add_system_malloc(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--system-malloc", action="store_true",
                        help="on CPU, keep glibc's default of unmapping large freed blocks (noisier timings)")


def add_bench_parser(commands: argparse._SubParsersAction) -> None:
    """``acnorm bench [table|network|sync|host]``."""
    bench = commands.add_parser(
        "bench", help="benchmarks: the per-layer table (default), whole networks, SyncACNorm, host cost",
        description="Benchmarks, measured side by side in one run. Without a subcommand: the per-layer table.")
    modes = bench.add_subparsers(dest="mode", required=True, metavar="{table,network,sync,host}")

    table = modes.add_parser(
        "table", help="forward+backward of the reference, acnorm and nn.BatchNorm3d per layer (the default)")
    _add_device(table)
    _add_case_options(table, "the standard set for the device")
    table.add_argument("--repeats", type=_int_at_least(1), default=20,
                       help="CPU: timed steps per layer (median); CUDA: repeats // 5 rounds of 10 * repeats ms")
    table.add_argument("--warmup", type=_int_at_least(0), default=3, help="CPU: untimed steps per layer first")
    table.add_argument("--no-compile", action="store_true", help="CUDA: leave out torch.compile of the reference")
    _add_out(table, "bench.md, bench.json and bench.png")
    _add_system_malloc(table)
    table.set_defaults(func=run_table)

    nets = modes.add_parser(
        "network", help="the training step of whole networks, BatchNorm original against converted to "
                        "AC-Norm and to the authors' formulation")
    _add_device(nets)
    nets.add_argument("--networks", nargs="+", choices=list(network.NETWORKS),
                      help="default: all; on a GPU a set of rows sized to about 3 minutes")
    nets.add_argument("--dtypes", nargs="+", choices=DTYPES,
                      help="bfloat16 and float16 mean autocast (default: float32, on a GPU also bfloat16)")
    nets.add_argument("--layouts", nargs="+", choices=LAYOUTS, help="channels_last: 3D networks only")
    nets.add_argument("--modes", nargs="+", choices=list(network.MODES),
                      help="eager steps (default), torch.compile, or torch.compile with CUDA graphs (GPU)")
    nets.add_argument("--repeats", type=_int_at_least(1), default=20, help="rounds are repeats // 4, at least 3")
    nets.add_argument("--quick", action="store_true", help="CPU sizes: a smoke test of the path, not a speed claim")
    _add_out(nets, "bench-network.md, .json and .png")
    nets.set_defaults(func=run_network)

    sync = modes.add_parser(
        "sync", help="SyncACNorm against ACNorm and BatchNorm in gloo processes on the CPU")
    sync.add_argument("--processes", type=_int_at_least(2), default=2, metavar="N",
                      help="gloo processes (default 2)")
    _add_case_options(sync, "the CPU set")
    sync.add_argument("--repeats", type=_int_at_least(1), default=20, help="timed steps per layer (median)")
    sync.add_argument("--warmup", type=_int_at_least(0), default=3, help="untimed steps per layer first")
    _add_out(sync, "bench-sync.md and bench-sync.json")
    _add_system_malloc(sync)
    sync.set_defaults(func=run_sync)

    host = modes.add_parser(
        "host", help="the eager step's host time against its wall and CUDA-graph time, and where it goes",
        description="The eager step's host time against its wall and CUDA-graph time, and the Python "
                    "functions and operators it goes to. On a CPU also the Python calls, aten ops, new "
                    "storages and wall time of one step against BatchNorm3d, the kernel launches doing "
                    "nothing (host-cost.md).")
    _add_device(host)
    _add_case_options(host, "this profile's own cases")
    host.add_argument("--repeats", type=_int_at_least(10), default=20, help="timed steps per layer (median)")
    _add_out(host, "host-profile.md (and on a CPU host-cost.md)")
    _add_system_malloc(host)
    host.set_defaults(func=run_host)


def add_audit_parser(commands: argparse._SubParsersAction) -> None:
    """``acnorm audit``."""
    audit = commands.add_parser(
        "audit", help="the kernel audit: compiled Triton kernels' registers, spills and load widths, bytes "
                      "per fused op under the interpreter, the CUDA module's kernels; no GPU needed")
    audit.add_argument("--archs", type=_archs, default=(80, 90, 100), help="targets, e.g. 80,90,100")
    audit.add_argument("--quick", action="store_true", help="one launch set per kernel family")
    _add_out(audit, "audit.md and audit.json")
    audit.set_defaults(func=run_audit)


def with_default_bench_mode(argv: Sequence[str]) -> list[str]:
    """``argv`` with ``table`` put after ``bench`` when no mode follows it, so
    that ``acnorm bench --device cpu`` is the per-layer table."""
    argv = list(argv)
    if argv[:1] == ["bench"] and (len(argv) == 1 or argv[1] not in (*BENCH_MODES, "-h", "--help")):
        argv.insert(1, "table")
    return argv
