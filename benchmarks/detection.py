"""Detection: Faster R-CNN SE-R50-FPN against R50-FPN inference time per image, through the Detectron2 builders.

Both models come from the project's configs through the same builder (`detection/`), with random weights:
speed does not depend on the values. Inputs are images already at the test size (the model itself does not
resize), so the time is the model's: normalisation, backbone, FPN, RPN, ROI heads and post-processing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from .models import Settings
from .report import Row, Section, ratio_figure
from .timing import CLOCKS, Spread, interleave, synchronizer

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "SE-R50-FPN": REPO / "configs/detectron2/faster_rcnn_se_r50.yaml",
    "R50-FPN": REPO / "configs/detectron2/faster_rcnn_r50.yaml",
}
TARGET = 1.05  # SE-R50-FPN / R50-FPN inference time, at most
# the self-test keeps the box head small; the real sets use the configs' test-time proposal counts
TINY_OPTS = ("MODEL.RPN.PRE_NMS_TOPK_TEST", "100", "MODEL.RPN.POST_NMS_TOPK_TEST", "20")
# (height, width) of the test image by preset: the default at the configs' 800-pixel test scale; both sides are
# multiples of 32, so FPN pads nothing
IMAGE_SIZES = {"default": (800, 1216), "quick": (512, 768), "tiny": (128, 160)}


def image_size(settings: Settings) -> tuple[int, int]:
    if settings.tiny:
        return IMAGE_SIZES["tiny"]
    return IMAGE_SIZES["default"] if settings.resolution >= 224 else IMAGE_SIZES["quick"]


def run_detection(settings: Settings, log: Callable[[str], None] = print) -> Section:
    h, w = image_size(settings)
    section = Section(f"Detection: Faster R-CNN inference, one {w}x{h} image per call (Detectron2)")
    try:
        import detectron2  # noqa: F401
    except ImportError:
        section.skipped = "Detectron2 is not installed (it installs from source: see the README)"
        return section
    missing = [str(p.relative_to(REPO)) for p in CONFIGS.values() if not p.is_file()]
    if missing:
        section.skipped = f"config(s) not found: {', '.join(missing)}"
        return section
    from detection.detectron2 import build_model_from_config

    opts = TINY_OPTS if settings.tiny else ()
    models = {}
    for name, path in CONFIGS.items():
        torch.manual_seed(0)
        models[name] = build_model_from_config(path, opts, device=settings.device)  # eval mode, random weights
    image = torch.rand(3, h, w, device=settings.device) * 255
    batch = [{"image": image, "height": h, "width": w}]

    def infer(model):
        def step():
            with torch.inference_mode():
                model(batch)

        return step

    log(f"timing detection: {len(models)} models, {settings.repeats} rounds")
    times = interleave(
        {name: infer(m) for name, m in models.items()},
        repeats=settings.repeats,
        warmup=max(1, settings.warmup),
        sync=synchronizer(torch.device(settings.device)),
        clock=CLOCKS[settings.clock],
    )
    section.rows = [Row(name, Spread.of(t), 1) for name, t in times.items()]
    what = "SE-R50-FPN / R50-FPN (infer)"
    section.figures.append(
        ratio_figure("detection_se_overhead_infer", what, times["SE-R50-FPN"], times["R50-FPN"], TARGET)
    )
    return section
