"""Does AC-Norm help? The finetuning study behind ``acnorm demo``.

A small BatchNorm U-Net is pretrained on tissue segmentation of the ICBM152
template (cached on disk), then finetuned on a few-shot lobe segmentation of
the Colin27 brain (:mod:`.data`): a few axial slices of the left hemisphere
to train on (mirrored at random, so the network sees both hemispheres'
orientation), the right hemisphere of every slice to test on, so no test
voxel's label is ever seen in training. Every method gets the same seeds, and per seed the
same head initialisation and the same batches:

- ``scratch``: the U-Net from random initialisation;
- ``vanilla``: the pretrained U-Net, new head, everything trained;
- ``l2sp``: vanilla with the L2-SP penalty pulling the pretrained weights
  towards their starting point;
- ``acnorm-T0.5``, ``acnorm-T1``, ``acnorm-T2``: BatchNorm converted to AC-Norm
  at that temperature;
- ``identity-S``: the AC-Norm layer with S replaced by the identity, so the
  only change from vanilla is the frozen source affine beside a trainable
  target affine and the doubled effective affine ``2 gamma_t``;
- ``dense-S``: AC-Norm without the sparsification (S = A).

The last two separate what AC-Norm changes: if ``identity-S`` does as well as
AC-Norm, the gain comes from the doubling, not from the correlation.

2D slices rather than 3D patches: the target has one subject, and a 3D
network would see a handful of patches per step on 2 CPU cores, where a 2D
network sees whole axial slices of the same voxels in milliseconds.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from . import zoo
from .data import Domain
from .training import FULL, METHODS, SMOKE, Run, Settings, finetune, pretrained_source, pyplot, target_split


def finetune_all(source: Domain, target: Domain, settings: Settings, cache: Path, device: torch.device,
                 methods=METHODS, progress: Callable[[str], None] = lambda line: None) -> list[Run]:
    """Every method on every seed; the same head and batches per seed."""
    pretrained = pretrained_source(source, settings, cache, device, progress)
    split = target_split(target, settings.train_slices)
    runs = []
    total = len(methods) * settings.seeds
    for seed in range(settings.seeds):
        for method in methods:
            runs.append(finetune(method, pretrained, split, len(target.classes), settings, seed, device))
            progress(f"[{len(runs)}/{total}] seed {seed} {method}: Dice {runs[-1].dice:.3f}, "
                     f"{1000 * runs[-1].seconds_per_step:.0f} ms/step")
    return runs


def _paired(runs: list[Run], method: str, baseline: str) -> tuple[float, float]:
    """Mean paired difference of ``method`` over ``baseline`` and the paired t-test p-value."""
    a = {r.seed: r.dice for r in runs if r.method == method}
    b = {r.seed: r.dice for r in runs if r.method == baseline}
    seeds = sorted(a.keys() & b.keys())
    diffs = [a[s] - b[s] for s in seeds]
    if len(diffs) < 2:
        return (diffs[0] if diffs else math.nan), math.nan
    sd = statistics.stdev(diffs)
    mean = statistics.fmean(diffs)
    if sd == 0:
        return mean, (1.0 if mean == 0 else 0.0)
    from scipy import stats

    return mean, float(stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue)


def summary(runs: list[Run]) -> list[dict]:
    rows = []
    for method in dict.fromkeys(r.method for r in runs):
        scores = [r.dice for r in runs if r.method == method]
        rows.append({
            "method": method, "mean": statistics.fmean(scores),
            "sd": statistics.stdev(scores) if len(scores) > 1 else math.nan,
            "vs_vanilla": _paired(runs, method, "vanilla"), "vs_identity": _paired(runs, method, "identity-S"),
            "ms_per_step": 1000 * statistics.fmean(r.seconds_per_step for r in runs if r.method == method),
        })
    return rows


def finding(rows: list[dict]) -> str:
    """Two sentences that state the result with its numbers, whatever it is."""
    by = {r["method"]: r for r in rows}
    acnorm = max((r for r in rows if r["method"].startswith("acnorm-")), key=lambda r: r["mean"], default=None)
    if acnorm is None or "vanilla" not in by or "identity-S" not in by:
        return ""
    gain, p_gain = acnorm["vs_vanilla"]
    over_identity, p_identity = acnorm["vs_identity"]
    first = (f"The best AC-Norm ({acnorm['method']}) reached a mean Dice of {acnorm['mean']:.3f} against "
             f"{by['vanilla']['mean']:.3f} for vanilla finetuning ({gain:+.3f}, paired p = {p_gain:.2g}).")
    if over_identity > 0 and p_identity < 0.05:
        second = (f"It also beat the S = I control ({by['identity-S']['mean']:.3f}; {over_identity:+.3f}, "
                  f"p = {p_identity:.2g}), so the correlation itself contributes.")
    else:
        second = (f"The S = I control, which only doubles the target affine, reached "
                  f"{by['identity-S']['mean']:.3f} ({-over_identity:+.3f} against it, p = {p_identity:.2g}): "
                  "this run cannot credit the correlation beyond that doubling.")
    return f"{first} {second}"


def to_markdown(runs: list[Run], settings: Settings, machine: str, seconds: float) -> str:
    rows = summary(runs)
    lines = [
        "# Does AC-Norm help? Few-shot lobe segmentation of Colin27 from an ICBM152 tissue model", "",
        f"Machine: {machine}. Whole run: {seconds / 60:.1f} min. Settings: {json.dumps(asdict(settings))}.", "",
        "Source: tissue segmentation of the ICBM152 2009a T1 (pretrained once). Target: 7 lobes of the AAL "
        f"atlas on the Colin27 T1; finetuned on {settings.train_slices} axial slices of the left hemisphere, "
        "Dice measured on the right hemisphere of every slice (mean over the lobes). Paired over seeds: each "
        "seed gives every method the same head initialisation and the same batches. p: paired t-test.", "",
        f"**Finding.** {finding(rows)}", "",
        "| method | mean Dice | sd | vs vanilla | p | vs identity-S | p | ms / step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['mean']:.4f} | {r['sd']:.4f} | {r['vs_vanilla'][0]:+.4f} "
                     f"| {r['vs_vanilla'][1]:.3g} | {r['vs_identity'][0]:+.4f} | {r['vs_identity'][1]:.3g} "
                     f"| {r['ms_per_step']:.0f} |")
    lines += ["", "Per seed:", "", "| method | " + " | ".join(f"seed {s}" for s in range(settings.seeds)) + " |",
              "|---|" + "---:|" * settings.seeds]
    for method in dict.fromkeys(r.method for r in runs):
        scores = {r.seed: r.dice for r in runs if r.method == method}
        lines.append(f"| {method} | " + " | ".join(f"{scores.get(s, math.nan):.4f}"
                                                  for s in range(settings.seeds)) + " |")
    return "\n".join(lines) + "\n"


def write_plot(runs: list[Run], path: Path) -> bool:
    """Dice of every run, one column per method, means marked."""
    plt = pyplot()
    if plt is None:
        return False
    methods = list(dict.fromkeys(r.method for r in runs))
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, method in enumerate(methods):
        scores = [r.dice for r in runs if r.method == method]
        ax.scatter([i] * len(scores), scores, s=18, alpha=0.7)
        ax.hlines(statistics.fmean(scores), i - 0.3, i + 0.3, color="black")
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels(methods, rotation=30, ha="right")
    ax.set_ylabel("mean Dice over lobes (right hemisphere)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run_study(out: Path, smoke: bool = False, device: torch.device | None = None,
              progress: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)) -> str:
    """The whole study: returns the Markdown report, also written (with a PNG
    plot and the raw runs as JSON) into ``out``."""
    from ..bench.timing import machine_description
    from .data import check_available, load_source, load_target

    check_available()
    settings = SMOKE if smoke else FULL
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    progress("loading and resampling the images")
    source, target = load_source(), load_target()
    runs = finetune_all(source, target, settings, out / "cache", device, progress=progress)
    zoo_runs = zoo.transferability_runs(source, target, settings, out / "cache", device, progress=progress)
    report = (to_markdown(runs, settings, machine_description(device), time.perf_counter() - start)
              + "\n" + zoo.to_markdown(zoo_runs, settings))
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.md").write_text(report)
    (out / "demo.json").write_text(json.dumps({"finetuning": [asdict(r) for r in runs],
                                               "transferability": [asdict(r) for r in zoo_runs]}, indent=1))
    write_plot(runs, out / "demo.png")
    zoo.write_plot(zoo_runs, out / "demo-zoo.png")
    return report
