"""AC-Corr: which pretrained model to finetune.

After a short AC-Norm finetuning of a pretrained model on the target task,
each AC-Norm layer's matrix ``S`` between the pretrained ("source") affine and
the finetuned target affine says how the target channels came to correlate
with the source channels. A layer's score is the sum of the entries of its
``S`` (temperature 1, eps 1e-5, as the authors' tool); AC-Corr is the mean
over the chosen layers. Computed for several candidate models on the same
task, it ranks them without finetuning each to the end.

A layer's score, the sum of its ``S``, comes from
:func:`acnorm_fused.correlation.correlation_sum`, beside the definition of ``S``
every backend uses.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._checks import check_finite_affines_now
from .convert import convert_model
from .correlation import correlation_sum

__all__ = ["ac_corr", "ac_corr_layers", "load_checkpoint", "rank", "rank_checkpoints", "Candidate"]

# A model, a state dict, or the path of a saved one.
Checkpoint = nn.Module | Mapping[str, Tensor] | str | Path

# Key prefixes that wrappers add: DataParallel / DDP, and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Keys under which training scripts commonly nest the state dict.
_NESTING_KEYS = ("state_dict", "model_state_dict", "model")


def load_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """The state dict saved at ``path`` (also when nested under ``"state_dict"``,
    ``"model_state_dict"`` or ``"model"``), on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {str(path)!r}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ValueError(f"cannot read {str(path)!r} as a PyTorch checkpoint: {error}") from error
    for key in _NESTING_KEYS:
        if isinstance(loaded, Mapping) and isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
            break
    if not isinstance(loaded, Mapping) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise ValueError(f"{str(path)!r} holds no state dict (a mapping of names to tensors)")
    return dict(loaded)


def _strip_wrappers(name: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    return name


def _state_dict(checkpoint: Checkpoint) -> dict[str, Tensor]:
    """Names without wrapper prefixes mapped to tensors."""
    if isinstance(checkpoint, nn.Module):
        checkpoint = checkpoint.state_dict()
    elif isinstance(checkpoint, (str, Path)):
        checkpoint = load_checkpoint(checkpoint)
    return {_strip_wrappers(k): v for k, v in checkpoint.items()}


def _key(layer: str, leaf: str) -> str:
    """The state-dict key of ``leaf`` in ``layer`` (``""``: a bare layer's own state)."""
    return f"{layer}.{leaf}" if layer else leaf


def _layers_with(state: Mapping[str, Tensor], keys: tuple[str, str]) -> list[str]:
    """Layer names that have both ``keys`` (e.g. ``weight``, ``bias``), in state order."""
    names = []
    for key in state:
        layer, _, leaf = key.rpartition(".")
        if leaf == keys[0] and _key(layer, keys[1]) in state and layer not in names:
            names.append(layer)
    return names


def ac_corr_layers(
    source: Checkpoint, target: Checkpoint, layers: Iterable[str] | None = None
) -> dict[str, float]:
    """AC-Corr score of each AC-Norm layer: the sum of the entries of its ``S``.

    ``source`` is the pretrained model (or state dict, or its file) with the
    BatchNorm keys ``weight`` and ``bias``; ``target`` the short-finetuned
    AC-Norm model with ``weight_target`` and ``bias_target``. Prefixes such as
    ``module.`` (DataParallel, DDP) or ``_orig_mod.`` (torch.compile) are
    ignored. ``layers`` keeps the layers whose names start with one of the
    given prefixes; by default every AC-Norm layer of the target that the
    source has too.
    """
    source_state, target_state = _state_dict(source), _state_dict(target)
    target_layers = _layers_with(target_state, ("weight_target", "bias_target"))
    if not target_layers:
        raise ValueError("ac_corr: the target has no AC-Norm layer (no 'weight_target' and 'bias_target' keys)")
    source_layers = set(_layers_with(source_state, ("weight", "bias")))
    if layers is not None:
        prefixes = [_strip_wrappers(p) for p in ([layers] if isinstance(layers, str) else layers)]
        chosen = [name for name in target_layers if any(name.startswith(p) for p in prefixes)]
        if not chosen:
            raise ValueError(f"ac_corr: no AC-Norm layer of the target starts with {prefixes}; "
                             f"its layers are {target_layers}")
        missing = [name for name in chosen if name not in source_layers]
        if missing:
            raise ValueError(f"ac_corr: the source has no BatchNorm affine for layer(s) {missing}")
    else:
        chosen = [name for name in target_layers if name in source_layers]
        if not chosen:
            raise ValueError(f"ac_corr: the source has none of the target's AC-Norm layers {target_layers}")
    scores = {}
    for name in chosen:
        affine = [source_state[_key(name, "weight")], source_state[_key(name, "bias")],
                  target_state[_key(name, "weight_target")], target_state[_key(name, "bias_target")]]
        shapes = {tuple(t.shape) for t in affine}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:
            raise ValueError(
                f"ac_corr: layer {name!r} has source affine of shape {tuple(affine[0].shape)} and target "
                f"affine of shape {tuple(affine[2].shape)}; they must be the same 1-D shape"
            )
        with torch.no_grad():
            rows = [t.detach().float().cpu() for t in affine]
            # A NaN affine gives a NaN score, which would rank arbitrarily.
            check_finite_affines_now(f"ac_corr: layer {name!r}", torch.stack(rows))
            weight, bias, weight_target, bias_target = rows
            scores[name] = correlation_sum(weight, bias, weight_target, bias_target, eps=1e-5, temperature=1.0)
    return scores


def ac_corr(source: Checkpoint, target: Checkpoint, layers: Iterable[str] | None = None) -> float:
    """AC-Corr: the mean over layers of :func:`ac_corr_layers`."""
    scores = ac_corr_layers(source, target, layers)
    return sum(scores.values()) / len(scores)


@dataclass
class Candidate:
    """One pretrained model's AC-Corr, with its per-layer scores."""

    name: str
    score: float
    layer_scores: dict[str, float]


def _ranked(candidates: list[Candidate], ascending: bool) -> list[Candidate]:
    return sorted(candidates, key=lambda c: c.score, reverse=not ascending)


def rank(
    candidates: Mapping[str, Checkpoint],
    build_model: Callable[[], nn.Module],
    finetune: Callable[[nn.Module], Any],
    *,
    layers: Iterable[str] | None = None,
    temperature: float = 1.0,
    backend: str = "auto",
    ascending: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[Candidate]:
    """Score each candidate pretrained model on the target task and rank them.

    For each candidate, ``build_model()`` makes the BatchNorm network, the
    candidate's weights are loaded into it, it is converted to AC-Norm
    (:func:`acnorm_fused.convert_model` with ``temperature`` and ``backend``)
    and ``finetune(model)`` runs the short finetuning (a number of steps or
    one epoch). The AC-Corr between the loaded weights and the finetuned
    model is the candidate's score. Returned highest score first
    (``ascending=True`` reverses).
    """
    results = []
    for index, (name, checkpoint) in enumerate(candidates.items(), 1):
        model = build_model()
        model.load_state_dict(_state_dict(checkpoint))
        pretrained = {key: value.detach().clone() for key, value in model.state_dict().items()}
        model = convert_model(model, temperature=temperature, backend=backend)
        model.train()
        finetune(model)
        layer_scores = ac_corr_layers(pretrained, model, layers)
        results.append(Candidate(name, sum(layer_scores.values()) / len(layer_scores), layer_scores))
        if progress is not None:
            progress(f"[{index}/{len(candidates)}] {name}: AC-Corr {results[-1].score:.4f}")
    return _ranked(results, ascending)


def rank_checkpoints(
    pairs: Mapping[str, tuple[Checkpoint, Checkpoint]],
    layers: Iterable[str] | None = None,
    ascending: bool = False,
) -> list[Candidate]:
    """Rank candidates from ``name -> (pretrained, short-finetuned)`` checkpoints."""
    results = []
    for name, (pretrained, finetuned) in pairs.items():
        layer_scores = ac_corr_layers(pretrained, finetuned, layers)
        results.append(Candidate(name, sum(layer_scores.values()) / len(layer_scores), layer_scores))
    return _ranked(results, ascending)


def to_text(ranking: list[Candidate]) -> str:
    """The ranking as an aligned text table."""
    width = max([len("candidate")] + [len(c.name) for c in ranking])
    lines = [f"{'rank':>4}  {'candidate':<{width}}  {'AC-Corr':>10}  layers"]
    for position, candidate in enumerate(ranking, 1):
        lines.append(f"{position:>4}  {candidate.name:<{width}}  {candidate.score:>10.4f}  "
                     f"{len(candidate.layer_scores)}")
    return "\n".join(lines) + "\n"


def to_json(ranking: list[Candidate]) -> str:
    """The ranking as JSON, per-layer scores included."""
    return json.dumps([{"rank": i, **asdict(c)} for i, c in enumerate(ranking, 1)], indent=2)
