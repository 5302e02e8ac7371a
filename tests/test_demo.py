"""``acnorm demo``: the study's pieces on synthetic data, and the whole
pipeline on the real images when they are installed (CI installs them and
sets ACNORM_EXPECT_DEMO_DATA=1, so their absence fails there)."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from acnorm_fused import cli

pytest.importorskip("numpy", reason="the demo needs numpy: pip install 'acnorm-fused[demo]'")

from acnorm_fused.correlation import affinity_from_stack, stack_affines
from acnorm_fused.demo import data, study, training, zoo
from acnorm_fused.modules import ACNorm2d

from helpers import make_affines, random_input


@pytest.mark.parametrize("name,lobe", [
    ("Precentral_L", "frontal"), ("Frontal_Sup_Orb_R", "frontal"), ("Angular_L", "parietal"),
    ("Heschl_R", "temporal"), ("Calcarine_L", "occipital"), ("Cingulum_Post_R", "insula and cingulum"),
    ("Thalamus_L", "deep grey"), ("Vermis_4_5", "cerebellum"), ("Cerebelum_Crus1_R", "cerebellum"),
])
def test_aal_regions_map_to_lobes(name, lobe):
    assert data.TARGET_CLASSES[data.lobe_of_region(name)] == lobe


def test_dice_averages_the_present_foreground_classes():
    labels = torch.tensor([0, 1, 1, 2, 2, 0])
    guess = torch.tensor([0, 1, 0, 2, 2, 2])
    # class 1: 2*1/(1+2); class 2: 2*2/(3+2); class 3 absent
    assert training.dice(guess, labels, 4) == pytest.approx((2 / 3 + 4 / 5) / 2)


def _control(kind):
    layer = training.ControlNorm2d(5, kind, temperature=0.7)
    with torch.no_grad():
        for name, value in zip(("weight", "bias", "weight_target", "bias_target"), make_affines(5, 3)):
            getattr(layer, name).copy_(value)
    return layer


def test_identity_control_doubles_the_target_affine():
    layer = _control("identity")
    x = random_input((4, 5, 3, 3), 1)
    expected = F.batch_norm(x, None, None, 2 * layer.weight_target, 2 * layer.bias_target, True, 0.0, layer.eps)
    torch.testing.assert_close(layer(x), expected)


def test_controls_follow_the_layers_update_rule():
    """momentum=None is the cumulative average, as AC-Norm's, and the counter advances."""
    x1, x2 = random_input((4, 5, 3, 3), 5, mean=1.0), random_input((4, 5, 3, 3), 6, mean=-2.0)
    for kind in ("identity", "dense"):
        control = training.ControlNorm2d(5, kind, momentum=None)
        reference = ACNorm2d(5, momentum=None, backend="torch")
        for x in (x1, x2):
            control(x)
            reference(x)
        assert int(control.num_batches_tracked) == 2
        torch.testing.assert_close(control.running_mean, reference.running_mean)
        torch.testing.assert_close(control.running_mean, torch.cat([x1, x2]).mean((0, 2, 3)))


def test_dense_control_uses_the_unsparsified_correlation():
    layer = _control("dense")
    x = random_input((4, 5, 3, 3), 2)
    a = affinity_from_stack(stack_affines(layer.weight, layer.bias, layer.weight_target, layer.bias_target),
                            layer.eps, 0.7)
    assert (a > 0).all()  # nothing zeroed
    w = layer.weight_target + a @ layer.weight_target
    b = layer.bias_target + a @ layer.bias_target
    torch.testing.assert_close(layer(x), F.batch_norm(x, None, None, w, b, True, 0.0, layer.eps))
    layer(x).sum().backward()
    assert layer.weight_target.grad is not None and layer.weight.grad is None


def test_each_method_gets_its_model_and_the_seed_s_head():
    pretrained = training.UNet(3, width=4)
    heads = {}
    for method in training.METHODS:
        model = training.prepare(method, pretrained, classes=8, width=4, seed=7)
        heads[method] = model.head.weight.detach()
        norms = [type(m) for m in model.modules() if isinstance(m, (torch.nn.BatchNorm2d, ACNorm2d))]
        if method.startswith("acnorm-"):
            assert set(norms) == {ACNorm2d}
            assert all(m.temperature == float(method[8:]) for m in model.modules() if isinstance(m, ACNorm2d))
        elif method.endswith("-S"):
            assert set(norms) == {training.ControlNorm2d}
            assert {m.kind for m in model.modules() if isinstance(m, training.ControlNorm2d)} == {method[:-2]}
        else:
            assert set(norms) == {torch.nn.BatchNorm2d}
        if method != "scratch":
            torch.testing.assert_close(model.enc1[0].weight, pretrained.enc1[0].weight)
    for method in training.METHODS:
        torch.testing.assert_close(heads[method], heads["vanilla"])
    with pytest.raises(ValueError, match="unknown method"):
        training.prepare("fancy", pretrained, 8, 4, 0)


def test_paired_statistics_and_the_finding_say_what_happened():
    pytest.importorskip("scipy", reason="the paired t-test needs scipy: pip install 'acnorm-fused[demo]'")
    runs = [training.Run(m, s, d, 0.01) for s, ds in enumerate([(0.60, 0.64, 0.66), (0.62, 0.65, 0.69),
                                                               (0.58, 0.61, 0.65)])
            for m, d in zip(("vanilla", "acnorm-T1", "identity-S"), ds)]
    rows = {r["method"]: r for r in study.summary(runs)}
    assert rows["acnorm-T1"]["vs_vanilla"][0] == pytest.approx(0.0333, abs=1e-4)
    assert rows["acnorm-T1"]["vs_vanilla"][1] < 0.05
    text = study.finding(list(rows.values()))
    assert "acnorm-T1" in text and "cannot credit the correlation" in text


def test_restoration_input_is_noisy_with_a_third_of_the_cells_blanked():
    images = torch.ones(6, 1, 88, 108)
    corrupted = zoo.corrupt(images, torch.Generator().manual_seed(0))
    again = zoo.corrupt(images, torch.Generator().manual_seed(0))
    torch.testing.assert_close(corrupted, again)
    blank = corrupted == 0
    assert 0.25 < blank.float().mean().item() < 0.42
    kept = corrupted[~blank] - 1.0
    assert 0.4 < kept.std().item() < 0.6 and abs(kept.mean().item()) < 0.02


@pytest.mark.parametrize("sign", [1, -1])
def test_kendall_tau_keeps_its_sign(sign):
    pytest.importorskip("scipy", reason="Kendall's tau comes from scipy: pip install 'acnorm-fused[demo]'")
    dice = {"tissue": 0.6, "restoration-T1": 0.5, "restoration-xray": 0.45, "random": 0.4}
    runs = [zoo.ZooRun(source, seed, sign * d + 0.01 * seed, d + 0.001 * seed)
            for seed in range(2) for source, d in dice.items()]
    tau, p, points = zoo.kendall(runs)["the source means"]
    assert tau == pytest.approx(sign) and points == 4
    assert zoo.kendall(runs)["every (source, seed) run"][2] == 8
    text = zoo.finding(runs)
    assert ("is positive" if sign > 0 else "is negative") in text
    assert "tissue, restoration-T1, restoration-xray, random" in text


def test_xray_crops_are_slices_of_the_radiographs():
    try:
        crops = data.load_xray_crops(5)
    except data.MissingData as error:
        if os.environ.get("ACNORM_EXPECT_DEMO_DATA") == "1":
            pytest.fail(str(error))
        pytest.skip(str(error))
    assert crops.shape == (5, *data.GRID_SHAPE[:2]) and crops.dtype == "float32"
    assert abs(crops.mean()) < 1e-4 and crops.std(axis=(1, 2)) == pytest.approx([1.0] * 5, abs=1e-3)
    assert len({round(float(c[0, 0]), 4) for c in crops}) == 5  # five different places


def test_missing_target_data_says_what_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(data, "MRICRON", tmp_path)
    with pytest.raises(data.MissingData, match="apt-get install mricron-data"):
        data.load_target()


@pytest.mark.slow
def test_smoke_run_end_to_end(tmp_path, capsys):
    try:
        data.load_target()
        data.load_source()
    except data.MissingData as error:
        if os.environ.get("ACNORM_EXPECT_DEMO_DATA") == "1":
            pytest.fail(str(error))
        pytest.skip(str(error))
    assert cli.main(["demo", "--smoke", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "demo.md").read_text()
    for method in training.METHODS:
        assert f"| {method} |" in report
    assert "**Finding.**" in report and (tmp_path / "demo.json").is_file()
    assert list((tmp_path / "cache").glob("source-unet-*.pt"))
    assert "## Transferability" in report and "Kendall's tau" in report
    for source in zoo.SOURCES:
        assert f"| {source} |" in report
    transfer = json.loads((tmp_path / "demo.json").read_text())["transferability"]
    assert {r["source"] for r in transfer} == set(zoo.SOURCES)
    assert all(math.isfinite(r["ac_corr"]) and 0 < r["ac_corr"] for r in transfer)
    assert len(list((tmp_path / "cache").glob("zoo-restoration-*.pt"))) == 2


@pytest.mark.parametrize("package,load,message", [
    ("scipy", "load_target", "the demo needs scipy"),
    ("pydicom", "load_xray_crops", "comes with pydicom and pydicom-data"),
])
def test_a_missing_package_is_named_not_a_module_error(monkeypatch, package, load, message):
    real_find_spec = data.importlib.util.find_spec
    monkeypatch.setattr(data.importlib.util, "find_spec",
                        lambda name, *args: None if name == package else real_find_spec(name, *args))
    monkeypatch.setitem(sys.modules, package, None)  # its import fails, as when absent
    with pytest.raises(data.MissingData, match=message):
        getattr(data, load)(*([2] if load == "load_xray_crops" else []))


def test_demo_says_what_is_missing_before_any_run(monkeypatch, tmp_path, capsys):
    """Without pydicom the demo stops at once with what to install, not after the study's runs."""
    for check in ("_nibabel", "_icbm_folder", "_mricron_file"):  # everything else present
        monkeypatch.setattr(data, check, lambda *args: None)
    real_find_spec = data.importlib.util.find_spec
    monkeypatch.setattr(data.importlib.util, "find_spec",
                        lambda name, *args: None if name == "pydicom" else real_find_spec(name, *args))
    monkeypatch.setattr(study, "finetune_all", lambda *args, **kwargs: pytest.fail("a run started"))
    assert cli.main(["demo", "--smoke", "--out", str(tmp_path / "out")]) == 2
    assert "acnorm demo: the unrelated modality (radiographs) comes with pydicom" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
