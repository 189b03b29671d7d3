"""The model zoo: exact parameter counts, the paper's complexity figures, every option and name."""

import pytest
import torch
from torch import nn

import backbones as B
from backbones.ablations import PAPER_TABLES
from backbones.complexity import count_macs, count_params

RELEASED_PARAMS = {
    "resnet50": 25_557_032,
    "se_resnet50": 28_088_024,
    "se_resnet101": 49_326_872,
    "se_resnet152": 66_821_848,
    "se_resnext50_32x4d": 27_559_896,
    "senet154": 115_088_984,
}


@pytest.mark.parametrize("name,expected", RELEASED_PARAMS.items())
def test_parameter_counts_equal_released_models(name, expected):
    assert count_params(B.create_model(name)) == expected


ABLATION_ROWS = [
    pytest.param(row, id=f"table{key}-{row.label}")
    for key in ("10", "13", "15", "16")
    for row in PAPER_TABLES[key][1]
    if row.paper_params_m is not None
]


@pytest.mark.parametrize("row", ABLATION_ROWS)
def test_ablation_params_land_on_paper_figures(row):
    params_m = count_params(B.create_model(row.model, **row.overrides)) / 1e6
    # The paper prints one decimal, and its r=4/8/32, SE_Stage_4 and SE_3x3 figures sit 0.05-0.11M above the
    # exact count of the architecture it describes (no FC biases); r=2/16, stages 2/3 and NoSqueeze agree.
    assert abs(params_m - row.paper_params_m) < 0.12, params_m


def test_caffe_style_gmacs_match_paper():
    r50 = count_macs(B.create_model("resnet50", style="caffe")) / 1e9
    se50 = count_macs(B.create_model("se_resnet50", style="caffe")) / 1e9
    nosqueeze = count_macs(B.create_model("se_resnet50", style="caffe", se_squeeze="none")) / 1e9
    assert 3.855 <= r50 <= 3.88 and round(r50, 2) == 3.86
    assert 3.86 <= se50 <= 3.88 and round(se50, 2) == 3.87
    assert round(nosqueeze, 2) == 4.27  # Table 16
    pytorch_style = count_macs(B.create_model("resnet50")) / 1e9
    assert 4.05 < pytorch_style < 4.15  # stride in the 3x3 costs ~0.23 GMACs more


def _build_small(name, **kw):
    return B.create_model(name, num_classes=7, **kw).eval()


@pytest.mark.parametrize("name", B.list_models())
def test_every_registered_model_runs_and_reports_features(name):
    model = _build_small(name)
    size = 32 if name.startswith("cifar_") else 64
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model(x)
    assert logits.shape == (2, 7)
    assert [f["name"] for f in model.feature_info] == list(feats)
    for info in model.feature_info:
        f = feats[info["name"]]
        assert f.shape == (2, info["channels"], size // info["stride"], size // info["stride"])
    if not name.startswith("cifar_"):
        assert list(feats) == ["res2", "res3", "res4", "res5"]
        assert [f["stride"] for f in model.feature_info] == [4, 8, 16, 32]
    has_se = any(isinstance(m, B.SqueezeExcite) for m in model.modules())
    assert has_se == ("se_" in name or name == "senet154")


def test_registry_errors_list_valid_choices():
    with pytest.raises(ValueError, match="se_resnet50") as err:
        B.create_model("se_resnet49")
    assert "senet154" in str(err.value)
    with pytest.raises(ValueError, match="se_reduction") as err:
        B.create_model("se_resnet50", reduction=8)
    assert "unknown option" in str(err.value)
    with pytest.raises(ValueError, match="'standard', 'pre', 'post', 'identity', '3x3'"):
        B.create_model("se_resnet50", se_placement="after")
    with pytest.raises(ValueError, match="'sigmoid', 'tanh', 'relu'"):
        B.create_model("se_resnet50", se_gate="swish")
    with pytest.raises(ValueError, match="stages"):
        B.create_model("se_resnet50", se_stages=(1,))
    with pytest.raises(ValueError, match="'pytorch', 'caffe'"):
        B.create_model("resnet50", style="tf")
    # a basic block has no bottleneck width: a wide or grouped request is refused, not silently ignored
    with pytest.raises(ValueError, match="width_per_group=128.*block='bottleneck'"):
        B.create_model("resnet18", width_per_group=128)
    with pytest.raises(ValueError, match="groups=32"):
        B.create_model("se_resnet34", groups=32, width_per_group=4)


# ---- the SE block ---------------------------------------------------------------------------------------


def test_se_block_matches_the_papers_formula():
    se = B.SqueezeExcite(32, reduction=4)
    x = torch.randn(3, 32, 5, 6)
    z = x.mean((2, 3))
    w1, b1 = se.fc1.weight.flatten(1), se.fc1.bias
    w2, b2 = se.fc2.weight.flatten(1), se.fc2.bias
    s = torch.sigmoid(torch.relu(z @ w1.T + b1) @ w2.T + b2)
    torch.testing.assert_close(se(x), x * s[:, :, None, None])
    assert se.fc1.weight.shape == (8, 32, 1, 1)


def test_se_conv_and_linear_forms_are_equivalent():
    """A 1x1 conv on the squeezed vector and a Linear layer are the same operation (peers store either)."""
    se = B.SqueezeExcite(64, reduction=16, bias=False)
    fc1 = nn.Linear(64, 4, bias=False)
    fc2 = nn.Linear(4, 64, bias=False)
    fc1.weight.data.copy_(se.fc1.weight.flatten(1))
    fc2.weight.data.copy_(se.fc2.weight.flatten(1))
    x = torch.randn(2, 64, 7, 7)
    linear = x * torch.sigmoid(fc2(torch.relu(fc1(x.mean((2, 3))))))[:, :, None, None]
    torch.testing.assert_close(se(x), linear)
    assert se.fc1.bias is None and se.fc2.bias is None


@pytest.mark.parametrize("gate,fn", [("sigmoid", torch.sigmoid), ("tanh", torch.tanh), ("relu", torch.relu)])
@pytest.mark.parametrize("squeeze", ["avg", "max", "none"])
def test_se_squeeze_and_gate_options(squeeze, gate, fn):
    se = B.SqueezeExcite(16, reduction=2, squeeze=squeeze, gate=gate)
    x = torch.randn(2, 16, 4, 4)
    pooled = {"avg": x.mean((2, 3), keepdim=True), "max": x.amax((2, 3), keepdim=True), "none": x}[squeeze]
    expected = x * fn(se.fc2(torch.relu(se.fc1(pooled))))
    torch.testing.assert_close(se(x), expected)


def test_nosqueeze_gates_each_position_separately():
    se = B.SqueezeExcite(8, reduction=2, squeeze="none")
    x = torch.randn(1, 8, 3, 3)
    y = se(x)
    x2 = x.clone()
    x2[..., 0, 0] += 5.0  # a change at one position changes the output at that position only
    changed = (se(x2) - y).abs().sum(1)[0] > 0
    assert changed[0, 0] and changed.sum() == 1


def test_se_hidden_width_rounding():
    assert B.SqueezeExcite(64, 16).fc1.out_channels == 4
    assert B.SqueezeExcite(64, 16, divisor=8).fc1.out_channels == 8  # timm's rd_divisor
    assert B.SqueezeExcite(16, 16).fc1.out_channels == 1


# ---- placement, stages, styles ----------------------------------------------------------------------------


def _captured_se_input(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    seen = {}
    module = block.se if block.se is not None else block.se_3x3
    # a pre-hook: in inference the fused SE scale-and-sum reuses its input's memory for the output
    handle = module.register_forward_pre_hook(lambda m, inp: seen.setdefault("x", inp[0].clone()))
    with torch.no_grad():
        block(x)
    handle.remove()
    return seen["x"]


@pytest.mark.parametrize("placement", ["standard", "pre", "post", "identity", "3x3"])
def test_se_placements_see_the_tensor_the_paper_describes(placement):
    model = B.create_model("se_resnet50", layers=(1, 1, 1, 1), se_placement=placement).eval()
    block = model.layer2[0]  # a projection block: in 256 -> out 512, stride 2
    x = torch.randn(1, 256, 16, 16)
    with torch.no_grad():
        shortcut = block.downsample(x)
        h = block.relu(block.bn1(block.conv1(x)))
        h3 = block.relu(block.bn2(block.conv2(h)))
        branch_plain = block.bn3(block.conv3(h3))
        expected = {
            "standard": branch_plain,  # residual branch output, before the sum
            "pre": x,  # the unit's input
            "post": block.relu(branch_plain + shortcut),  # after the sum and its ReLU
            "identity": shortcut,  # the identity path
            "3x3": h3,  # after the 3x3 conv
        }[placement]
    torch.testing.assert_close(_captured_se_input(block, x), expected)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("stage,index", [(1, 0), (1, 1)], ids=["projection", "identity"])
def test_standard_se_unit_computes_relu_of_scaled_branch_plus_shortcut(stage, index, grad):
    """The fused SE scale-and-sum (in place when autograd records nothing) leaves the unit's input untouched."""
    model = B.create_model("se_resnet50", layers=(2, 1, 1, 1)).eval()
    block = getattr(model, f"layer{stage}")[index]
    x = torch.randn(1, 64 if index == 0 else 256, 8, 8)
    x_before = x.clone()
    with torch.no_grad():
        shortcut = x if block.downsample is None else block.downsample(x)
        expected = torch.relu(block.se(block.branch(x)) + shortcut)
    with torch.set_grad_enabled(grad):
        out = block(x)
    assert out.requires_grad == grad
    torch.testing.assert_close(out, expected)
    assert torch.equal(x, x_before)


def test_se_stages_select_where_blocks_carry_se():
    model = B.create_model("se_resnet50", se_stages=(2, 3, 4))
    for i, layer in enumerate((model.layer1, model.layer2, model.layer3, model.layer4)):
        assert all((blk.se is not None) == (i < 3) for blk in layer)


def test_caffe_style_strides_in_first_1x1_and_ceil_pool():
    caffe = B.create_model("resnet50", style="caffe")
    torch_style = B.create_model("resnet50")
    assert caffe.layer2[0].conv1.stride == (2, 2) and caffe.layer2[0].conv2.stride == (1, 1)
    assert torch_style.layer2[0].conv1.stride == (1, 1) and torch_style.layer2[0].conv2.stride == (2, 2)
    assert caffe.maxpool.ceil_mode and caffe.maxpool.padding == 0
    assert not torch_style.maxpool.ceil_mode and torch_style.maxpool.padding == 1
    # same weights, different geometry: identical parameter shapes, different outputs
    caffe.load_state_dict(torch_style.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(caffe.eval()(x), torch_style.eval()(x))


def test_senet154_follows_the_appendix():
    m = B.create_model("senet154", layers=(1, 1, 1, 1))
    assert [m.conv1.kernel_size, m.conv2.kernel_size, m.conv3.kernel_size] == [(3, 3)] * 3
    assert m.conv3.out_channels == 128
    assert m.layer1[0].downsample[0].kernel_size == (1, 1)  # stride-1 projection stays 1x1
    assert m.layer2[0].downsample[0].kernel_size == (3, 3) and m.layer2[0].downsample[0].stride == (2, 2)
    blk = m.layer1[0]
    assert (blk.conv1.out_channels, blk.conv2.out_channels, blk.conv2.groups) == (128, 256, 64)
    assert m.drop_rate == 0.2 and m.maxpool.ceil_mode


def test_zero_init_last_makes_blocks_start_as_identity():
    model = B.create_model("se_resnet50", layers=(2, 1, 1, 1), zero_init_last=True).eval()
    assert all(float(blk.bn3.weight.abs().sum()) == 0 for blk in model.layer1)
    x = torch.randn(1, 256, 8, 8).relu()
    with torch.no_grad():
        torch.testing.assert_close(model.layer1[1](x), x)  # relu(0 * se + x) == x for x >= 0


@pytest.mark.parametrize(
    "norm",
    [lambda c: nn.BatchNorm2d(c, affine=False), lambda c: nn.GroupNorm(8, c, affine=False)],
    ids=["batch", "group"],
)
def test_norms_without_affine_weights_build_and_run(norm):
    model = B.create_model("se_resnet18", layers=(1, 1, 1, 1), norm_layer=norm, num_classes=3).eval()
    assert model.bn1.weight is None  # nothing for the init to set to identity
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_gradients_flow_through_se():
    model = B.create_model("se_resnet18", num_classes=5)
    model(torch.randn(2, 3, 64, 64)).logsumexp(1).sum().backward()
    for name, p in model.named_parameters():
        if ".se." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_num_classes_zero_returns_pooled_features():
    model = B.create_model("se_resnet18", num_classes=0).eval()
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 512)
    model.reset_classifier(3)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)


# ---- memory format, autocast, compile -----------------------------------------------------------------------


def test_channels_last_and_bf16_autocast():
    model = B.create_model("se_resnext50_32x4d", layers=(1, 1, 1, 1), num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        cl = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
        torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert low.dtype == torch.bfloat16
    assert torch.allclose(low.float(), ref, atol=0.15 * ref.abs().max().item())


def test_torch_compile_traces_without_graph_breaks():
    model = B.create_model("se_resnet18", layers=(1, 1, 1, 1), num_classes=4).eval()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


# ---- CIFAR networks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,millions",
    [("cifar_resnet110", 1.7), ("cifar_resnet164", 1.7), ("cifar_wrn16_8", 11.0)],
)
def test_cifar_models_match_their_papers_sizes(name, millions):
    plain = count_params(B.create_model(name))
    se = count_params(B.create_model(name.replace("cifar_", "cifar_se_")))
    assert round(plain / 1e6, 1) == millions
    assert se > plain


def test_cifar_preact_blocks_and_se_position():
    model = B.create_model("cifar_se_resnet164", depth_per_stage=1).eval()
    blk = model.layer2[0]
    assert isinstance(blk.shortcut, nn.Conv2d) and blk.shortcut.stride == (2, 2)
    x = torch.randn(1, 64, 8, 8)
    with torch.no_grad():
        pre = blk.relu(blk.bn1(x))
        expected_se_input = blk.branch(pre)
        torch.testing.assert_close(_captured_se_input(blk, x), expected_se_input)
        torch.testing.assert_close(blk(x), blk.se(expected_se_input) + blk.shortcut(pre))


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_cifar_drop_rate_reaches_every_block_type(block):
    x = torch.randn(2, 3, 32, 32)
    kw = {"block": block, "depth_per_stage": 1, "widths": (16, 32, 64)}
    dropped = B.create_model("cifar_resnet110", drop_rate=0.5, **kw).train()
    assert not torch.allclose(dropped(x), dropped(x))
    plain = B.create_model("cifar_resnet110", **kw).train()
    assert torch.equal(plain(x), plain(x))


# ---- the model-info tool ----------------------------------------------------------------------------------


def test_model_info_prints_tables_from_our_models(capsys):
    from tools.model_info import main

    main(["--table", "13"])
    out = capsys.readouterr().out
    for label, params in [("SE_Stage_2", "25.58"), ("SE_Stage_3", "25.69"), ("SE_Stage_4", "26.34")]:
        line = next(ln for ln in out.splitlines() if label in ln)
        assert params in line
    main(["cifar_se_resnet110", "--set", "se_reduction=8"])
    out = capsys.readouterr().out
    assert "cifar_se_resnet110" in out and "se_reduction" in out
    with pytest.raises(SystemExit):  # overrides would silently not reach the paper's rows
        main(["--table", "13", "--set", "se_reduction=8"])
