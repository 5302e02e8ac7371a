"""The pieces of the demo's experiments that both the finetuning study
(:mod:`.study`) and the transferability check (:mod:`.zoo`) use: settings,
the U-Net, the finetuning methods, training, evaluation and the model cache.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

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
        # The layer's update rule, as AC-Norm's (momentum=None: the cumulative average).
        momentum, double_update = self._update_rule()
        out = F.batch_norm(x, self.running_mean, self.running_var, w, b, self.training,
                           effective_momentum(momentum, double_update), self.eps)
        if self.training and self.track_running_stats:
            assert self.num_batches_tracked is not None  # registered with track_running_stats
            self.num_batches_tracked.add_(1)
        return out


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
           penalty: Callable[[], torch.Tensor | float] | None = None, device: torch.device | None = None,
           after_step: Callable[[int], None] | None = None) -> float:
    """Adam on cross-entropy (inside ``mask``, mirrored with the slices it
    flips), ``after_step(steps done)`` called after each step; returns
    seconds per step; on the CPU unless ``device`` is given."""
    device = device or torch.device("cpu")
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
    model: nn.Module
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


def _l2sp(model: nn.Module, alpha: float, beta: float) -> Callable[[], torch.Tensor | float]:
    """L2-SP: alpha/2 |w - w0|^2 over the pretrained weights, beta/2 |w|^2 over the new head."""
    start = {name: p.detach().clone() for name, p in model.named_parameters() if not name.startswith("head.")}

    def penalty() -> torch.Tensor | float:
        total: torch.Tensor | float = 0.0
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


def pyplot():
    """matplotlib's pyplot drawing off-screen, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt
