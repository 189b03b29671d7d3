"""detectron2's own tools on our configs: TracingAdapter export (tools/deploy/export_model.py's tracing), fvcore
FLOP counts that see the SE block, and tools/analyze_model.py through tools/d2_tool.py."""

import ast
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("detectron2", reason="Detectron2 is not installed (it cannot be pip-installed on a fresh machine)")

import detectron2.checkpoint  # noqa: E402
import detectron2.config  # noqa: E402
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES  # noqa: E402
from detectron2.export import TracingAdapter  # noqa: E402
from detectron2.layers import FrozenBatchNorm2d  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from backbones import ResNet, SEOptions  # noqa: E402
from backbones.complexity import count_macs  # noqa: E402
from detection.detectron2 import SENetCheckpointer, get_config  # noqa: E402
from detection.detectron2.analysis import FlopCountAnalysis  # noqa: E402
from detection.detectron2.backbone import SEResNet  # noqa: E402
from detection.detectron2.tools import find_tool, patched_for_tools  # noqa: E402
from detection.synthetic import make_synthetic_coco  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
SE_R50 = REPO / "configs/detectron2/faster_rcnn_se_r50.yaml"
SMALL = ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "INPUT.MIN_SIZE_TEST", 64, "INPUT.MAX_SIZE_TEST", 96]


def test_tracing_export_equals_eager():
    """export_model.py's tracing export (TracingAdapter + torch.jit.trace, saved and loaded as model.ts) of the
    SE-R50-FPN detector gives the eager model's detections, on the traced image and on one of another size."""
    cfg = get_config(SE_R50, [*SMALL, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0])
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(0)
    for m in model.modules():  # frozen BN statistics that a lost buffer would show
        if isinstance(m, FrozenBatchNorm2d):
            m.running_mean.normal_(0, 0.1, generator=g)
            m.running_var.uniform_(0.5, 1.5, generator=g)

    def inference(model, inputs):
        return [{"instances": model.inference(inputs, do_postprocess=False)[0]}]

    image = torch.randint(0, 256, (3, 64, 96), generator=g).float()
    adapter = TracingAdapter(model, [{"image": image}], inference)
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(adapter, (image,)), buffer)
    buffer.seek(0)
    exported = torch.jit.load(buffer)
    for x in (image, torch.randint(0, 256, (3, 96, 64), generator=g).float()):
        with torch.no_grad():
            expected = inference(model, [{"image": x}])[0]["instances"]
            got = adapter.outputs_schema(exported(x))[0]["instances"]
        assert len(expected) > 0 and len(got) == len(expected)
        assert torch.equal(got.pred_classes, expected.pred_classes)
        torch.testing.assert_close(got.pred_boxes.tensor, expected.pred_boxes.tensor, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(got.scores, expected.scores, rtol=1e-4, atol=1e-5)


def test_flop_count_includes_the_se_ops():
    """fvcore (detectron2's FlopCountAnalysis, our handles) counts the SE block's squeeze and scale besides its
    FCs: SE minus plain backbone is exactly what backbones.complexity (torch's FlopCounterMode) counts."""
    x = torch.randn(1, 3, 64, 64)
    fvcore, macs = {}, {}
    for se in (SEOptions(), None):
        backbone = SEResNet(layers=(1, 1, 1, 1), se=se, norm="FrozenBN").eval()
        flops = FlopCountAnalysis(backbone, x)
        fvcore[se is not None] = (flops.total(), flops.by_operator())
        macs[se is not None] = count_macs(ResNet(layers=(1, 1, 1, 1), se=se, num_classes=0), (3, 64, 64))
    (se_total, se_ops), (plain_total, plain_ops) = fvcore[True], fvcore[False]
    # one squeeze and one scale per block, each over the block's output: C x H x W of res2..res5
    assert se_ops["sum"] == se_ops["mul"] == sum(256 * 2**i * (16 // 2**i) ** 2 for i in range(4))
    assert "sum" not in plain_ops and "mul" not in plain_ops
    assert se_total - plain_total == macs[True] - macs[False] > se_ops["conv"] - plain_ops["conv"]


def test_tool_patches_last_only_while_the_tool_runs():
    with patched_for_tools():
        assert "SENET" in detectron2.config.get_cfg().MODEL
        assert detectron2.checkpoint.DetectionCheckpointer is SENetCheckpointer
    assert "SENET" not in detectron2.config.get_cfg().MODEL
    assert detectron2.checkpoint.DetectionCheckpointer is not SENetCheckpointer
    assert find_tool("analyze_model").name == "analyze_model.py"
    with pytest.raises(FileNotFoundError, match="deploy/export_model.py"):
        find_tool("no_such_tool")


def test_analyze_model_counts_the_se_ops_of_our_config(tmp_path):
    """detectron2's tools/analyze_model.py (as installed with detectron2) through tools/d2_tool.py, on the
    Table 7 SE-R50 config and a tiny COCO 2017 tree: it runs, and its per-operator GFLOPs include the SE's."""
    paths = make_synthetic_coco(tmp_path / "synthetic", num_train=1, num_val=1, image_size=64, seed=1)
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    categories = [{"id": c["id"], "name": c["name"]} for c in COCO_CATEGORIES if c["isthing"]]
    for split in ("train", "val"):
        data = {**json.loads(paths[f"{split}_json"].read_text()), "categories": categories}
        (coco / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(data))
        paths[f"{split}_images"].rename(coco / f"{split}2017")
    command = [sys.executable, str(REPO / "tools/d2_tool.py"), "analyze_model", "--tasks", "flop", "-n", "1"]
    command += ["--config-file", str(SE_R50), *map(str, SMALL)]
    env = {**os.environ, "DETECTRON2_DATASETS": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    lines = output.splitlines()
    heading = next(i for i, line in enumerate(lines) if "for each type of operators" in line)
    per_op = dict(ast.literal_eval(lines[heading + 1]))
    assert per_op["sum"] > 0 and per_op["mul"] > 0 and per_op["conv"] > 0
    assert "Total GFlops" in output and "backbone.bottom_up.layer1" in output  # the table, by module
