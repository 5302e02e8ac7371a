"""Does AC-Corr tell which pretrained model to finetune? The transferability
check of ``acnorm demo``.

A small zoo of source models for the same U-Net, from most to least related
to the target (lobes of the Colin27 brain):

- ``tissue``: supervised tissue segmentation of the ICBM152 T1 (the study's
  pretrained model);
- ``restoration-T1``: self-supervised restoration (denoising and inpainting)
  of the same ICBM152 T1 slices, no labels;
- ``restoration-xray``: the same restoration task on radiographs, an
  unrelated modality;
- ``random``: no pretraining.

Each is finetuned on the target with AC-Norm (temperature 1) and the study's
seeds, heads and batches. AC-Corr (:func:`acnorm_fused.transferability.ac_corr`)
is read after the first ``corr_steps`` steps, the "short finetuning" of the
authors' recipe; the Dice at the end of the same run is the outcome it should
predict. Kendall's tau between the two, with its sign, says whether it does:
positive when a higher AC-Corr goes with a higher final Dice.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..transferability import ac_corr
from .data import Domain, load_xray_crops
from .training import (
    Settings,
    UNet,
    axial_slices,
    cached_model,
    draw_batches,
    finetune,
    pretrained_source,
    pyplot,
    target_split,
)

SOURCES = ("tissue", "restoration-T1", "restoration-xray", "random")
# Radiograph crops the X-ray restoration model trains on.
XRAY_CROPS = 128
# The finetuning method of every source.
METHOD = "acnorm-T1"


def corrupt(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The restoration task's input: Gaussian noise (sd 0.5) and a third of
    the 8 x 8 cells blanked."""
    noisy = images + 0.5 * torch.randn(images.shape, generator=generator)
    cells = torch.rand((images.shape[0], 1, images.shape[2] // 8 + 1, images.shape[3] // 8 + 1),
                       generator=generator) < 1 / 3
    blank = cells.repeat_interleave(8, 2).repeat_interleave(8, 3)[..., :images.shape[2], :images.shape[3]]
    return noisy.masked_fill(blank, 0.0)


def pretrained_restoration(name: str, images: torch.Tensor, settings: Settings, cache: Path,
                           device: torch.device, progress: Callable[[str], None]) -> nn.Module:
    """A U-Net trained to restore ``images`` (N, 1, X, Y) from :func:`corrupt`
    (mean squared error), from ``cache`` when it is there."""

    def train(model: nn.Module) -> None:
        optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
        generator = torch.Generator().manual_seed(0)
        progress(f"pretraining {name}: {settings.zoo_pretrain_steps} steps")
        model.train()
        for batch, _ in draw_batches(settings.zoo_pretrain_steps, torch.arange(len(images)), 2 * settings.batch,
                                     seed=0):
            clean = images[batch]
            loss = F.mse_loss(model(corrupt(clean, generator).to(device)), clean.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return cached_model(cache / f"zoo-{name}-{settings.key()}.pt", lambda: UNet(1, settings.width), train,
                        device, progress, f"{name} source model")


def source_models(source: Domain, settings: Settings, cache: Path, device: torch.device,
                  progress: Callable[[str], None]) -> dict[str, nn.Module]:
    """The zoo, in the order of :data:`SOURCES`."""
    xray = torch.from_numpy(load_xray_crops(XRAY_CROPS))[:, None]
    torch.manual_seed(0)
    return {
        "tissue": pretrained_source(source, settings, cache, device, progress),
        "restoration-T1": pretrained_restoration("restoration-T1", axial_slices(source)[0], settings, cache,
                                                 device, progress),
        "restoration-xray": pretrained_restoration("restoration-xray", xray, settings, cache, device, progress),
        "random": UNet(len(source.classes), settings.width).to(device),
    }


@dataclass
class ZooRun:
    source: str
    seed: int
    ac_corr: float  # after settings.corr_steps steps
    dice: float  # at the end of the finetuning


def transferability_runs(source: Domain, target: Domain, settings: Settings, cache: Path, device: torch.device,
                         progress: Callable[[str], None] = lambda line: None) -> list[ZooRun]:
    """Every source of the zoo finetuned with AC-Norm on ``settings.zoo_seeds`` seeds."""
    models = source_models(source, settings, cache, device, progress)
    split = target_split(target, settings.train_slices)
    runs = []
    total = len(models) * settings.zoo_seeds
    for seed in range(settings.zoo_seeds):
        for name, pretrained in models.items():
            score: list[float] = []

            def read_corr(model: nn.Module, step: int, score: list[float] = score) -> None:
                if step == settings.corr_steps:
                    score.append(ac_corr(model, model))  # its own source affine beside its target affine

            run = finetune(METHOD, pretrained, split, len(target.classes), settings, seed, device, read_corr)
            runs.append(ZooRun(name, seed, score[0] if score else math.nan, run.dice))
            progress(f"[zoo {len(runs)}/{total}] seed {seed} {name}: AC-Corr {runs[-1].ac_corr:.2f} "
                     f"after {settings.corr_steps} steps, final Dice {run.dice:.3f}")
    return runs


def kendall(runs: list[ZooRun]) -> dict[str, tuple[float, float, int]]:
    """Kendall's tau (tau, p, points) between AC-Corr and final Dice, over the
    sources' means and over every (source, seed) run."""
    from scipy import stats

    sources = list(dict.fromkeys(r.source for r in runs))
    means = [(statistics.fmean(r.ac_corr for r in runs if r.source == s),
              statistics.fmean(r.dice for r in runs if r.source == s)) for s in sources]
    result = {}
    every_run = [(r.ac_corr, r.dice) for r in runs]
    for label, pairs in (("the source means", means), ("every (source, seed) run", every_run)):
        corr, dice = np.array(pairs).T
        test = stats.kendalltau(corr, dice)
        result[label] = (float(test.statistic), float(test.pvalue), len(pairs))
    return result


def finding(runs: list[ZooRun]) -> str:
    """One or two sentences on whether AC-Corr ranked the sources, with the sign."""
    tau, p, points = kendall(runs)["the source means"]
    by_dice = sorted(dict.fromkeys(r.source for r in runs),
                     key=lambda s: -statistics.fmean(r.dice for r in runs if r.source == s))
    if math.isnan(tau):
        verdict = "is undefined (a constant score)"
    elif tau > 0:
        verdict = "is positive: a higher AC-Corr went with a higher final Dice"
    elif tau < 0:
        verdict = "is negative: AC-Corr ranked the sources against their final Dice"
    else:
        verdict = "is zero: AC-Corr did not rank the sources"
    return (f"Kendall's tau between AC-Corr after the short finetuning and the final Dice over the "
            f"{points} sources {verdict} (tau = {tau:+.2f}, p = {p:.2g}); by final Dice the sources rank "
            f"{', '.join(by_dice)}.")


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else math.nan


def to_markdown(runs: list[ZooRun], settings: Settings) -> str:
    """The transferability section of the study's report."""
    lines = [
        "## Transferability: does AC-Corr rank the source models?", "",
        f"Each source model below was finetuned with AC-Norm (T = 1) on the same target split, heads and batches "
        f"as the study ({settings.zoo_seeds} seed{'s' if settings.zoo_seeds != 1 else ''}); AC-Corr was read after "
        f"{settings.corr_steps} of the {settings.finetune_steps} steps, the final Dice at the end. Sources: "
        f"supervised tissue segmentation of the ICBM152 T1; self-supervised restoration (denoising, inpainting) "
        f"of the same T1 slices and of radiographs ({settings.zoo_pretrain_steps} steps each); no pretraining. "
        "A fresh BatchNorm has every source signature beta / (|gamma| + eps) at 0, so for the `random` source "
        "every entry of A ties with the diagonal one, S keeps whole rows, and AC-Corr is the layer's channel "
        "count, its largest possible value.", "",
        f"**Finding.** {finding(runs)}", "",
        "| source | AC-Corr | sd | final Dice | sd |", "|---|---:|---:|---:|---:|",
    ]
    for source in dict.fromkeys(r.source for r in runs):
        corr = [r.ac_corr for r in runs if r.source == source]
        dice = [r.dice for r in runs if r.source == source]
        lines.append(f"| {source} | {statistics.fmean(corr):.3f} | {_sd(corr):.3f} | {statistics.fmean(dice):.4f} "
                     f"| {_sd(dice):.4f} |")
    lines += ["", "| Kendall's tau of AC-Corr and final Dice | tau | p | points |", "|---|---:|---:|---:|"]
    for label, (tau, p, points) in kendall(runs).items():
        lines.append(f"| over {label} | {tau:+.3f} | {p:.3g} | {points} |")
    return "\n".join(lines) + "\n"


def write_plot(runs: list[ZooRun], path: Path) -> bool:
    """AC-Corr against final Dice, one colour per source."""
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(5, 4))
    for source in dict.fromkeys(r.source for r in runs):
        mine = [r for r in runs if r.source == source]
        ax.scatter([r.ac_corr for r in mine], [r.dice for r in mine], s=24, label=source)
    ax.set_xlabel("AC-Corr after the short finetuning")
    ax.set_ylabel("final Dice")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
