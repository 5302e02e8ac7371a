"""AC-Corr: the score against a hand computation, the ranking, and ``acnorm rank``."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import acnorm_fused as acn
from acnorm_fused.cli import main
from acnorm_fused.transferability import load_checkpoint, rank, rank_checkpoints

from helpers import hand_correlation, make_affines

LAYERS = {"enc.bn": 5, "dec.bn": 3}


def _pair(seed: int, spread: float = 0.3):
    """A pretrained BatchNorm state dict and an AC-Norm one saved by DataParallel."""
    source, target = {}, {}
    for k, (name, channels) in enumerate(LAYERS.items()):
        w, b, wt, bt = make_affines(channels, seed + k, spread=spread)
        source.update({f"{name}.weight": w, f"{name}.bias": b, f"{name}.running_mean": torch.zeros(channels)})
        target.update({f"module.{name}.weight": w, f"module.{name}.bias": b,
                       f"module.{name}.weight_target": wt, f"module.{name}.bias_target": bt})
    return source, target


def _hand_score(source, target, name):
    """SPEC section 6: the sum of the entries of S (eps 1e-5, temperature 1), in float64."""
    s = hand_correlation(source[f"{name}.weight"], source[f"{name}.bias"],
                         target[f"module.{name}.weight_target"], target[f"module.{name}.bias_target"])
    return float(s.sum())


def test_ac_corr_matches_a_hand_computation():
    source, target = _pair(0)
    hand = {name: _hand_score(source, target, name) for name in LAYERS}
    assert acn.ac_corr_layers(source, target) == pytest.approx(hand, rel=1e-5)
    assert acn.ac_corr(source, target) == pytest.approx(sum(hand.values()) / len(hand), rel=1e-5)
    assert acn.ac_corr(source, target, layers=["dec"]) == pytest.approx(hand["dec.bn"], rel=1e-5)
    assert acn.ac_corr(source, target, layers="module.enc.") == pytest.approx(hand["enc.bn"], rel=1e-5)


def test_ac_corr_of_models_and_files(tmp_path):
    source, target = _pair(1)
    torch.save({"state_dict": source, "epoch": 3}, tmp_path / "pretrained.pt")
    torch.save(target, tmp_path / "finetuned.pt")
    model = nn.Module()
    model.enc = nn.Module()
    model.enc.bn = acn.ACNorm2d(5)
    model.dec = nn.Module()
    model.dec.bn = acn.ACNorm2d(3)
    model.load_state_dict({k[len("module."):]: v for k, v in target.items()}, strict=False)
    expected = acn.ac_corr(source, target)
    assert acn.ac_corr(tmp_path / "pretrained.pt", str(tmp_path / "finetuned.pt")) == pytest.approx(expected)
    assert acn.ac_corr(source, model) == pytest.approx(expected)


def test_a_bare_layer():
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    layer = acn.convert_model(bn)
    with torch.no_grad():
        layer.bias_target.add_(0.3)
    s = hand_correlation(bn.weight, bn.bias, layer.weight_target, layer.bias_target)
    assert acn.ac_corr_layers(bn, layer) == pytest.approx({"": float(s.sum())}, rel=1e-5)


def test_unchanged_target_keeps_only_the_diagonal():
    """With the target affine equal to the source one, S keeps only A[i, i] per
    row (distinct signatures), the smallest a row can keep."""
    source, _ = _pair(2)
    target = {f"{k[:-len('weight')]}weight_target" if k.endswith("weight") else
              f"{k[:-len('bias')]}bias_target": v for k, v in source.items() if k.endswith(("weight", "bias"))}
    for name, score in acn.ac_corr_layers(source, target).items():
        s = hand_correlation(source[f"{name}.weight"], source[f"{name}.bias"],
                             source[f"{name}.weight"], source[f"{name}.bias"])
        assert torch.count_nonzero(s) == s.shape[0]
        assert score == pytest.approx(float(s.diagonal().sum()), rel=1e-5)


@pytest.mark.parametrize("change,message", [
    (lambda s, t: t.clear() or t.update({"x.weight": torch.ones(2)}), "the target has no AC-Norm layer"),
    (lambda s, t: [s.pop(k) for k in list(s) if k.startswith(("enc", "dec"))], "the source has none of"),
    (lambda s, t: s.update({"enc.bn.weight": torch.ones(4), "enc.bn.bias": torch.ones(4)}),
     "layer 'enc.bn' has source affine of shape \\(4,\\)"),
])
def test_ac_corr_errors(change, message):
    source, target = _pair(3)
    change(source, target)
    with pytest.raises(ValueError, match=message):
        acn.ac_corr(source, target)


def test_ac_corr_layer_selection_errors():
    source, target = _pair(3)
    with pytest.raises(ValueError, match="no AC-Norm layer of the target starts with"):
        acn.ac_corr(source, target, layers=["middle"])
    del source["dec.bn.weight"]
    with pytest.raises(ValueError, match=r"the source has no BatchNorm affine for layer\(s\) \['dec.bn'\]"):
        acn.ac_corr(source, target, layers=["dec", "enc"])


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read .* as a PyTorch checkpoint"):
        load_checkpoint(tmp_path / "garbage.pt")
    torch.save([torch.ones(2)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="holds no state dict"):
        load_checkpoint(tmp_path / "list.pt")


# A toy zoo: the same network pretrained on the target task itself ("near") and
# on a different one ("far"), then finetuned briefly on the target task.

def _build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 1, 3, padding=1))


def _task_batch(shift: float, scale: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 1, 12, 12, generator=g)
    return x, torch.tanh(scale * x.roll(1, -1) + shift)


def _train(model, shift, scale, steps, seed=0):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for step in range(steps):
        x, y = _task_batch(shift, scale, seed + step)
        loss = (model(x) - y).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def test_rank_on_a_toy_zoo():
    """The candidate pretrained on the target task moves its affine less while
    finetuning, so fewer source channels pass its diagonal: a lower AC-Corr."""
    zoo = {"near": _train(_build(), 0.5, 2.0, 150).state_dict(),
           "far": _train(_build(), -1.0, -1.0, 150).state_dict()}
    finetuned = {}

    def finetune(model):
        _train(model, 0.5, 2.0, 20, seed=1000)
        finetuned[len(finetuned)] = model

    lines = []
    ranking = rank(zoo, _build, finetune, progress=lines.append)
    assert [c.name for c in ranking] == ["far", "near"]
    assert ranking[0].score > ranking[1].score + 0.2
    assert len(lines) == 2 and lines[0].startswith("[1/2] near: AC-Corr")
    # The scores are AC-Corr between each candidate and its finetuned model.
    assert ranking[1].score == pytest.approx(acn.ac_corr(zoo["near"], finetuned[0]))
    assert ranking[0].score == pytest.approx(acn.ac_corr(zoo["far"], finetuned[1]))
    assert [c.name for c in rank(zoo, _build, lambda m: _train(m, 0.5, 2.0, 20, seed=1000),
                                 ascending=True)] == ["near", "far"]


def _write_pairs(tmp_path):
    paths = {}
    for name, (seed, spread) in {"small-drift": (4, 0.05), "large-drift": (4, 1.0)}.items():
        source, target = _pair(seed, spread)
        torch.save(source, tmp_path / f"{name}-pretrained.pt")
        torch.save({"model": target}, tmp_path / f"{name}-finetuned.pt")
        paths[name] = (tmp_path / f"{name}-pretrained.pt", tmp_path / f"{name}-finetuned.pt")
    return paths


def test_rank_cli_text_and_json(tmp_path, capsys):
    paths = _write_pairs(tmp_path)
    args = ["rank"]
    for name, (pretrained, finetuned) in paths.items():
        args += ["--candidate", name, str(pretrained), str(finetuned)]
    expected = rank_checkpoints(paths)
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["rank", "candidate", "AC-Corr", "layers"]
    assert [line.split()[1] for line in out[1:]] == [c.name for c in expected]
    assert float(out[1].split()[2]) == pytest.approx(expected[0].score, abs=1e-4)
    assert main(args + ["--json", "--layers", "enc"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [row["rank"] for row in data] == [1, 2]
    assert all(list(row["layer_scores"]) == ["enc.bn"] for row in data)
    assert data[0]["score"] >= data[1]["score"]


@pytest.mark.parametrize("problem,message", [
    ("missing", "acnorm rank: no checkpoint file at"),
    ("duplicate", "candidate names must differ; repeated: a"),
    ("layers", "acnorm rank: ac_corr: no AC-Norm layer of the target starts with"),
])
def test_rank_cli_errors(tmp_path, capsys, problem, message):
    paths = _write_pairs(tmp_path)
    pretrained, finetuned = (str(p) for p in paths["small-drift"])
    args = ["rank", "--candidate", "a", pretrained, finetuned]
    if problem == "missing":
        args = ["rank", "--candidate", "a", str(tmp_path / "nope.pt"), finetuned]
    elif problem == "duplicate":
        args += ["--candidate", "a", pretrained, finetuned]
    else:
        args += ["--layers", "middle"]
    assert main(args) == 2
    assert message in capsys.readouterr().err
