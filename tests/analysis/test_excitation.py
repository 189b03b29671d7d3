"""backbones.analysis and tools/excitation.py: SE naming, excitation statistics, SE blocks replaced by the identity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backbones import SqueezeExcite, create_model, model_config
from backbones.analysis import (
    ExcitationRecorder,
    count_parameters,
    paper_blocks,
    se_blocks,
    se_parameters,
    select_blocks,
    without_se,
)
from backbones.checkpoints.loader import meta_model


def test_se_blocks_are_named_as_in_the_paper():
    se50 = meta_model(*model_config("se_resnet50"))  # the full depths, without weights
    cifar = meta_model(*model_config("cifar_se_resnet110"))
    names = list(se_blocks(se50))
    assert names[:4] == ["SE_2_1", "SE_2_2", "SE_2_3", "SE_3_1"] and names[-1] == "SE_5_3" and len(names) == 16
    assert paper_blocks(names) == ["SE_2_3", "SE_3_4", "SE_4_6", "SE_5_1", "SE_5_2", "SE_5_3"]  # Fig. 6 and 7
    assert se_blocks(se50)["SE_4_6"] is se50.layer3[5].se
    cifar_names = list(se_blocks(cifar))
    assert cifar_names[0] == "SE_2_1" and cifar_names[-1] == "SE_4_18" and len(cifar_names) == 54
    assert select_blocks(names, ["5", "SE_2_1"]) == ["SE_5_1", "SE_5_2", "SE_5_3", "SE_2_1"]
    with pytest.raises(ValueError, match="no SE block 'SE_6_1'"):
        select_blocks(names, ["SE_6_1"])


def _hand_excitations(model: torch.nn.Module, names: list[str], images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The excitation written out by hand from each SE block's input: sigmoid(W2 relu(W1 mean(x) + b1) + b2)."""
    captured = {}

    def capture(name):
        def hook(module, args):
            x = args[0].detach()
            s = x.mean((2, 3), keepdim=True)
            s = F.relu(F.conv2d(s, module.fc1.weight, module.fc1.bias))
            captured[name] = torch.sigmoid(F.conv2d(s, module.fc2.weight, module.fc2.bias)).flatten(1).double()

        return hook

    handles = [m.register_forward_pre_hook(capture(n)) for n, m in se_blocks(model).items() if n in names]
    with torch.no_grad():
        model(images)
    for h in handles:
        h.remove()
    return captured


@pytest.mark.parametrize("name", ["se_resnet50", "cifar_se_resnet110"])
def test_excitation_statistics_equal_a_hand_computation(name, one_thread):
    options = {"layers": (1, 1, 1, 1)} if name == "se_resnet50" else {"depth_per_stage": 1}
    model = create_model(name, num_classes=5, **options).eval()
    names = list(se_blocks(model))
    batches = [
        (torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 1, 3, 3, 3])),
        (torch.randn(3, 3, 32, 32), torch.tensor([3, 0, 1])),
    ]
    with ExcitationRecorder(model, names, num_classes=5) as recorder, torch.no_grad():
        for images, labels in batches:
            model(images)
            recorder.add(labels)
    stats = recorder.stats()
    hand = [_hand_excitations(model, names, images) for images, _ in batches]
    labels = torch.cat([lab for _, lab in batches])
    assert stats.counts.tolist() == [2, 3, 0, 4, 0]
    for block in names:
        e = torch.cat([h[block] for h in hand])  # (9, C)
        for c in (0, 1, 3):
            np.testing.assert_allclose(stats.mean[block][c], e[labels == c].mean(0).numpy(), rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(stats.std[block][c], e[labels == c].std(0, unbiased=False).numpy(), atol=1e-6)
        assert np.isnan(stats.mean[block][2]).all()  # no images of class 2
        np.testing.assert_allclose(stats.all_mean[block], e.mean(0).numpy(), rtol=1e-6)
        np.testing.assert_allclose(stats.all_std[block], e.std(0, unbiased=False).numpy(), atol=1e-6)
    assert not any(se.fc2._forward_hooks for se in se_blocks(model).values())  # hooks gone after the block


def _saturate(model: torch.nn.Module) -> None:
    """fc2 bias so large that every excitation is exactly 1.0 in float32 (sigmoid(1e4) rounds to 1)."""
    with torch.no_grad():
        for se in se_blocks(model).values():
            se.fc2.bias.fill_(1e4)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("se_resnet50", {}),  # the standard unit: SE scale and residual sum in one fused pass
        ("se_resnet18", {}),
        ("se_resnet50", {"se_placement": "pre"}),
        ("se_resnet50", {"se_placement": "post"}),
        ("se_resnet50", {"se_placement": "identity"}),
        ("se_resnet50", {"se_placement": "3x3"}),
        ("cifar_se_resnet110", {"depth_per_stage": 1}),
    ],
)
def test_identity_blocks_are_bit_identical_when_the_excitation_is_one(name, options, one_thread):
    model_options = {"layers": (1, 1, 1, 1)} if name != "cifar_se_resnet110" else {}
    model = create_model(name, num_classes=7, **model_options, **options).eval()
    _saturate(model)
    names = list(se_blocks(model))
    last_stage = [n for n in names if n.startswith(names[-1][:4])]
    x = torch.randn(2, 3, 64, 64)
    for removed in (last_stage, names):
        pruned = without_se(model, removed)
        with torch.no_grad():
            full, cut = model.forward_features(x), pruned.forward_features(x)
            assert all(torch.equal(full[k], cut[k]) for k in full)
            assert torch.equal(model(x), pruned(x))
        assert list(se_blocks(pruned)) == [n for n in names if n not in removed]
        assert count_parameters(pruned) == count_parameters(model) - se_parameters(model, removed)
    assert all(isinstance(se, SqueezeExcite) for se in se_blocks(model).values())  # the original is untouched


def test_removing_a_working_se_block_changes_the_output(one_thread):
    model = create_model("se_resnet50", layers=(1, 1, 1, 1), num_classes=7).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert not torch.equal(model(x), without_se(model, ["SE_5_1"])(x))
    with pytest.raises(ValueError, match="SE_9_9"):
        without_se(model, ["SE_9_9"])


def test_excitation_tool_on_the_smoke_checkpoint(cifar_checkpoint, tmp_path, one_thread):
    """The command line on the smoke-trained CIFAR model: Fig. 6 and 7, the numbers, the pruning table."""
    from classification.excitation import main

    stats, rows = main(
        [str(cifar_checkpoint), "--out", str(tmp_path), "--limit", "100", "--prune", "4", "--prune", "2,3,4"]
    )
    assert stats.blocks == ["SE_2_1", "SE_3_1", "SE_4_1"] and stats.counts.sum() == 100
    for picture in ("excitation_fig6.png", "excitation_fig7.png", "pruning.png"):
        assert 1_000 < (tmp_path / picture).stat().st_size < 200_000
    saved = np.load(tmp_path / "excitation.npz")
    np.testing.assert_array_equal(saved["SE_4_1/mean"], stats.mean["SE_4_1"])
    np.testing.assert_array_equal(saved["counts"], stats.counts)
    full, stage4, none = rows
    assert (full.variant, stage4.variant, none.variant) == ("full", "no SE_4", "no SE_2 SE_3 SE_4")
    assert none.increase == 0 and full.increase > stage4.increase > 0
    assert full.top1 <= 25  # the model learnt the synthetic classes
    csv_rows = (tmp_path / "pruning.csv").read_text().splitlines()
    assert len(csv_rows) == 4 and csv_rows[2].startswith("no SE_4,SE_4_1,")
