"""What the MMDetection tests share: the module skip when mmcv / mmdet are unusable, and the config paths."""

from pathlib import Path

import pytest
import torch

from detection.mmdet import runner as mmdet_runner


def require_mmdet() -> None:
    """Skip the calling test module unless mmcv (with its compiled ops), mmengine and mmdet are usable."""
    try:
        mmdet_runner.check_mmdet()
    except mmdet_runner.MMDetUnavailable as e:
        pytest.skip(f"MMDetection unavailable: {e}", allow_module_level=True)


def randomize_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial norm statistics and affine terms, so that a load which misses one shows in the features."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d | torch.nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


REPO = Path(__file__).resolve().parents[3]
CONFIGS = REPO / "configs" / "mmdet"
SMOKE = CONFIGS / "smoke" / "faster-rcnn_se-r50_fpn_synthetic.py"
TINY = (1, 1, 1, 1)  # one block per stage: the real wiring at a fraction of the cost

__all__ = ["CONFIGS", "REPO", "SMOKE", "TINY", "mmdet_runner", "randomize_norms", "require_mmdet"]
