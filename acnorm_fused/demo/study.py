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

import copy
import hashlib
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import convert_model
from ..correlation import affinity_from_stack, recalibrate, stack_affines
from ..functional import effective_momentum
from ..modules import ACNorm2d
from .data import Domain

METHODS = ("scratch", "vanilla", "l2sp", "acnorm-T0.5", "acnorm-T1", "acnorm-T2", "identity-S", "dense-S")


@dataclass(frozen=True)
class Settings:
    """Sizes of one study run."""

    seeds: int = 5
    pretrain_steps: int = 600
    finetune_steps: int = 250
    train_slices: int = 8  # axial slices of the left hemisphere to finetune on
    batch: int = 4
    width: int = 16  # channels of the U-Net's first level
    lr: float = 2e-3
    l2sp_alpha: float = 0.01
    l2sp_beta: float = 0.01
    # The transferability check (:mod:`.zoo`).
    zoo_seeds: int = 3
    zoo_pretrain_steps: int = 300  # of each self-supervised source
    corr_steps: int = 25  # the short AC-Norm finetuning after which AC-Corr is read

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


FULL = Settings()
SMOKE = Settings(seeds=2, pretrain_steps=10, finetune_steps=4, train_slices=2, batch=2, width=8,
                 zoo_seeds=1, zoo_pretrain_steps=4, corr_steps=2)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UNet(nn.Module):
    """A two-level 2D U-Net with BatchNorm after every convolution."""

    def __init__(self, classes: int, width: int = 16):
        super().__init__()
        self.enc1, self.enc2 = _block(1, width), _block(width, 2 * width)
        self.bottom = _block(2 * width, 4 * width)
        self.up2 = nn.ConvTranspose2d(4 * width, 2 * width, 2, stride=2)
        self.dec2 = _block(4 * width, 2 * width)
        self.up1 = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.dec1 = _block(2 * width, width)
        self.head = nn.Conv2d(width, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        b = self.bottom(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat((self.up2(b), e2), 1))
        d1 = self.dec1(torch.cat((self.up1(d2), e1), 1))
        return self.head(d1)


class ControlNorm2d(ACNorm2d):
    """AC-Norm with the correlation S replaced, for the study's controls:
    ``"identity"`` (S = I, so ``W = 2 gamma_t``) or ``"dense"`` (S = A, no
    sparsification). Running statistics move as AC-Norm's do."""

    def __init__(self, num_features: int, kind: str, **kwargs):
        super().__init__(num_features, **kwargs)
        if kind not in ("identity", "dense"):
            raise ValueError(f"ControlNorm2d: kind must be 'identity' or 'dense', got {kind!r}")
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        affines = stack_affines(self.weight, self.bias, self.weight_target, self.bias_target)
        if self.kind == "identity":
            s = torch.eye(self.num_features, device=x.device, dtype=affines.dtype)
        else:
            s = affinity_from_stack(affines, self.eps, self.temperature)
        w, b = recalibrate(s, torch.stack((self.weight_target, self.bias_target)))
        return F.batch_norm(x, self.running_mean, self.running_var, w, b, self.training,
                            effective_momentum(self.momentum), self.eps)


def _replace_norms(module: nn.Module, kind: str) -> None:
    for name, child in module.named_children():
        if isinstance(child, ACNorm2d):
            control = ControlNorm2d(child.num_features, kind, eps=child.eps, momentum=child.momentum,
                                    temperature=child.temperature).to(child.weight.device)
            control.load_state_dict(child.state_dict())
            setattr(module, name, control)
        else:
            _replace_norms(child, kind)


def axial_slices(domain: Domain, min_brain: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images (Z, 1, X, Y), labels (Z, X, Y))`` of the slices with brain."""
    images = torch.from_numpy(np.ascontiguousarray(domain.image.transpose(2, 0, 1)))[:, None]
    labels = torch.from_numpy(np.ascontiguousarray(domain.labels.transpose(2, 0, 1)))
    keep = (labels > 0).flatten(1).sum(1) >= min_brain
    return images[keep], labels[keep]


@dataclass
class TargetSplit:
    """Few-shot training slices (loss on the left hemisphere only) and the test
    region (the right hemisphere of every slice)."""

    images: torch.Tensor
    labels: torch.Tensor
    train: torch.Tensor  # indices of the training slices
    train_mask: torch.Tensor  # (X, Y) bool: where the loss looks
    test_mask: torch.Tensor  # (X, Y) bool: where Dice is measured


def target_split(domain: Domain, train_slices: int) -> TargetSplit:
    images, labels = axial_slices(domain)
    # Evenly spread over the middle 60% of the brain's slices.
    lo, hi = int(0.2 * len(images)), int(0.8 * len(images))
    train = torch.linspace(lo, hi - 1, train_slices).round().long()
    x = torch.arange(images.shape[2])[:, None].expand(images.shape[2], images.shape[3])
    left = x < images.shape[2] // 2  # MNI x < 0: the left hemisphere
    return TargetSplit(images, labels, train, left, ~left)


def dice(prediction: torch.Tensor, labels: torch.Tensor, classes: int) -> float:
    """Mean Dice over the foreground classes present in ``labels``."""
    scores = []
    for c in range(1, classes):
        truth = labels == c
        if truth.any():
            guess = prediction == c
            scores.append(2 * (guess & truth).sum().item() / (guess.sum() + truth.sum()).item())
    return sum(scores) / len(scores)


def _train(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], images: torch.Tensor,
           labels: torch.Tensor, mask: torch.Tensor | None, lr: float,
           penalty: Callable[[], torch.Tensor] | None = None, device: torch.device = torch.device("cpu"),
           after_step: Callable[[int], None] | None = None) -> float:
    """Adam on cross-entropy (inside ``mask``, mirrored with the slices it
    flips), ``after_step(steps done)`` called after each step; returns
    seconds per step."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    start = time.perf_counter()
    for step, (batch, flips) in enumerate(batches, 1):
        x, y = images[batch].clone(), labels[batch].clone()
        # Left-right mirroring: the network learns both hemispheres' appearance
        # from one (a CNN is not mirror-equivariant by itself).
        x[flips], y[flips] = x[flips].flip(-2), y[flips].flip(-2)
        weights = torch.ones(y.shape, dtype=torch.bool) if mask is None else mask.expand(y.shape).clone()
        weights[flips] = weights[flips].flip(-2)
        x, y, weights = x.to(device), y.to(device), weights.to(device)
        loss = F.cross_entropy(model(x), y, reduction="none")[weights].mean()
        if penalty is not None:
            loss = loss + penalty()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step(step)
    return (time.perf_counter() - start) / max(len(batches), 1)


def draw_batches(count: int, pool: torch.Tensor, batch: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` batches of slice indices drawn from ``pool``, each with the
    samples to mirror left-right; the same for every method of a seed."""
    generator = torch.Generator().manual_seed(seed)
    return [(pool[torch.randint(len(pool), (batch,), generator=generator)],
             torch.rand(batch, generator=generator) < 0.5) for _ in range(count)]


def cached_model(path: Path, build: Callable[[], nn.Module], train: Callable[[nn.Module], None],
                 device: torch.device, progress: Callable[[str], None], label: str) -> nn.Module:
    """``build()`` trained by ``train`` from seed 0 and saved at ``path``, or
    loaded from ``path`` when a run before saved it."""
    if path.is_file():
        model = build()
        model.load_state_dict(torch.load(path, map_location="cpu"))
        progress(f"{label} from {path}")
        return model.to(device)
    torch.manual_seed(0)
    model = build().to(device)
    train(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


def pretrained_source(source: Domain, settings: Settings, cache: Path, device: torch.device,
                      progress: Callable[[str], None]) -> nn.Module:
    """The U-Net trained on the source task, from ``cache`` when it is there."""

    def train(model: nn.Module) -> None:
        images, labels = axial_slices(source)
        batches = draw_batches(settings.pretrain_steps, torch.arange(len(images)), 2 * settings.batch, seed=0)
        progress(f"pretraining on {source.name}: {settings.pretrain_steps} steps")
        _train(model, batches, images, labels, None, settings.lr, device=device)

    return cached_model(cache / f"source-unet-{settings.key()}.pt", lambda: UNet(len(source.classes), settings.width),
                        train, device, progress, "pretrained source model")


def prepare(method: str, pretrained: nn.Module, classes: int, width: int, seed: int) -> nn.Module:
    """The model a method finetunes, with the seed's head."""
    torch.manual_seed(seed)
    head = nn.Conv2d(width, classes, 1)
    if method == "scratch":
        model = UNet(classes, width)
        model.head = head
        return model
    model = copy.deepcopy(pretrained).cpu()
    model.head = head
    if method.startswith("acnorm-T"):
        convert_model(model, temperature=float(method[len("acnorm-T"):]))
    elif method in ("identity-S", "dense-S"):
        convert_model(model)
        _replace_norms(model, method.split("-")[0])
    elif method not in ("vanilla", "l2sp"):
        raise ValueError(f"acnorm demo: unknown method {method!r}; methods: {', '.join(METHODS)}")
    return model


def _l2sp(model: nn.Module, alpha: float, beta: float) -> Callable[[], torch.Tensor]:
    """L2-SP: alpha/2 |w - w0|^2 over the pretrained weights, beta/2 |w|^2 over the new head."""
    start = {name: p.detach().clone() for name, p in model.named_parameters() if not name.startswith("head.")}

    def penalty() -> torch.Tensor:
        total = 0.0
        for name, p in model.named_parameters():
            if name.startswith("head."):
                total = total + 0.5 * beta * p.square().sum()
            else:
                total = total + 0.5 * alpha * (p - start[name]).square().sum()
        return total

    return penalty


@torch.no_grad()
def evaluate(model: nn.Module, split: TargetSplit, classes: int, device: torch.device) -> float:
    model.eval()
    predictions = torch.cat([model(split.images[i:i + 16].to(device)).argmax(1).cpu()
                             for i in range(0, len(split.images), 16)])
    return dice(predictions[:, split.test_mask], split.labels[:, split.test_mask], classes)


@dataclass
class Run:
    method: str
    seed: int
    dice: float
    seconds_per_step: float


def finetune(method: str, pretrained: nn.Module, split: TargetSplit, classes: int, settings: Settings,
             seed: int, device: torch.device,
             after_step: Callable[[nn.Module, int], None] | None = None) -> Run:
    """Finetune ``pretrained`` on the target split with ``method`` and the
    seed's head and batches; ``after_step(model, steps done)`` watches it."""
    model = prepare(method, pretrained, classes, settings.width, seed).to(device)
    penalty = _l2sp(model, settings.l2sp_alpha, settings.l2sp_beta) if method == "l2sp" else None
    watch = None if after_step is None else (lambda step: after_step(model, step))
    batches = draw_batches(settings.finetune_steps, split.train, settings.batch, seed=1000 + seed)
    step = _train(model, batches, split.images, split.labels, split.train_mask, settings.lr, penalty, device, watch)
    return Run(method, seed, evaluate(model, split, classes, device), step)


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


def pyplot():
    """matplotlib's pyplot drawing off-screen, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


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

    from . import zoo

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
