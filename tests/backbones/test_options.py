"""The SE options object from the flat spelling down to the blocks; models that record how they were built; the
loader's mismatch errors carrying option names as data; one weight selection per build."""

import pytest
import torch

import backbones
from backbones import OptionMismatchError, SEOptions, build_model, create_model, create_pretrained, load_pretrained
from backbones.models.se import SqueezeExcite

TINY = (1, 1, 1, 1)


def test_flat_and_object_spellings_translate_both_ways():
    se = SEOptions.from_flat({"se": True, "se_reduction": 8, "se_stages": [2, 3, 4], "layers": TINY})
    assert se == SEOptions(reduction=8, stages=(2, 3, 4))
    assert SEOptions.from_flat(se.to_flat()) == se
    assert SEOptions.from_flat({"se": False, "se_reduction": 8}) is None
    assert SEOptions.from_flat({"se": se, "se_gate": "tanh"}) == SEOptions(reduction=8, stages=(2, 3, 4), gate="tanh")
    with pytest.raises(ValueError, match=r"unknown SE option\(s\) \['se_ratio'\]"):
        SEOptions.from_flat({"se": True, "se_ratio": 8})
    with pytest.raises(ValueError, match="se gate='softmax' is not one of"):
        SEOptions(gate="softmax")
    with pytest.raises(ValueError, match=r"se stages \[6\] are not among"):
        SEOptions(stages=(2, 6))


@pytest.mark.parametrize(("name", "stage_channels"), [("se_resnet50", 256), ("cifar_se_resnet110", 16)])
def test_reduction_reaches_every_se_block_through_the_options_object(name, stage_channels):
    overrides = {"layers": TINY} if name.startswith("se_") else {"depth_per_stage": 1}
    model = create_model(name, se_reduction=8, **overrides)
    assert model.arch["se"] == SEOptions(reduction=8)
    blocks = [m for m in model.modules() if isinstance(m, SqueezeExcite)]
    assert blocks and all(b.fc1.out_channels == b.fc1.in_channels // 8 for b in blocks)
    assert model.layer1[0].se.fc1.out_channels == stage_channels // 8


def test_cifar_networks_refuse_se_options_they_do_not_have():
    with pytest.raises(ValueError, match="unknown option.*se_placement"):
        create_model("cifar_se_resnet110", se_placement="pre")


def test_models_record_how_they_were_built():
    model = create_model("se_resnet50", layers=TINY, se_reduction=8, style="caffe")
    assert model.model_cfg.name == "se_resnet50"
    assert model.model_cfg.options == {"layers": TINY, "se_reduction": 8, "style": "caffe"}
    again = build_model(model.model_cfg.name, **model.model_cfg.options)
    again.load_state_dict(model.state_dict())  # same keys and shapes
    assert again.arch == model.arch
    assert model.arch["stride_in_1x1"] and model.arch["stem_pool_ceil"]  # what style="caffe" resolved to


def test_mismatch_errors_name_the_options_as_data():
    source = create_model("se_resnet50", layers=TINY, se_reduction=16)
    target = create_model("se_resnet50", layers=TINY, se_reduction=8)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(OptionMismatchError, match="set se_reduction=16") as e:
        load_pretrained(target, source.state_dict())
    assert e.value.options == {"se_reduction": 16}
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())

    plain = create_model("resnet50", layers=TINY)
    with pytest.raises(OptionMismatchError) as e:
        load_pretrained(plain, source.state_dict())
    assert e.value.options == {"se": True}


def test_geometry_mismatch_names_stride_and_pool():
    from backbones.checkpoints.loader import Selection, load_selection, select_weights

    ref = create_model("se_resnet50", layers=TINY)
    checkpoint = backbones.read_checkpoint(ref.state_dict())
    sel = select_weights(checkpoint, ref.state_dict())
    caffe_sel = Selection(
        sel.state_dict, sel.scheme, sel.prefix, sel.ema, {"stride_in_1x1": True, "stem_pool_ceil": True}
    )
    with pytest.raises(OptionMismatchError, match="style='caffe'") as e:
        load_selection(ref, checkpoint, caffe_sel)
    assert e.value.options == {"stride_in_1x1": True, "stem_pool_ceil": True}


def test_create_pretrained_selects_the_weights_once(monkeypatch):
    from backbones import factory
    from backbones.checkpoints import loader

    calls = []
    real = loader.select_weights

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(factory, "select_weights", counting)
    monkeypatch.setattr(loader, "select_weights", counting)
    source = create_model("se_resnet50", layers=TINY, se_bias=False)
    model = create_pretrained("se_resnet50", source.state_dict(), layers=TINY)
    assert len(calls) == 1
    assert model.arch["se"].bias is False
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values(), strict=True)
    )


def test_save_checkpoint_records_what_the_model_recorded(tmp_path):
    model = create_model("se_resnet50", layers=TINY, se_reduction=8, num_classes=10)
    backbones.save_checkpoint(model, tmp_path / "m.safetensors")
    rebuilt = create_pretrained(None, tmp_path / "m.safetensors")
    assert rebuilt.model_cfg.name == "se_resnet50" and rebuilt.arch == model.arch
    assert all(
        torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), model.state_dict().values(), strict=True)
    )
    with pytest.raises(ValueError, match="records no registry name"):
        backbones.save_checkpoint(backbones.ResNet(layers=TINY), tmp_path / "x.safetensors")
