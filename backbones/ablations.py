"""The paper's ablation tables (SE-ResNet-50 on ImageNet) as model configurations with the reported figures.

Ablations drop the FC biases (paper, "FC biases") and count GFLOPs on the Caffe-style geometry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class AblationRow:
    label: str
    model: str
    overrides: dict[str, Any] = field(default_factory=dict)
    paper_params_m: float | None = None  # millions, as printed in the paper
    paper_gflops: float | None = None
    paper_top1_top5: tuple[float, float] | None = None  # ImageNet val error %


_ABLATION = {"style": "caffe", "se_bias": False}


def _se(label: str, params=None, gflops=None, err=None, **overrides) -> AblationRow:
    return AblationRow(label, "se_resnet50", {**_ABLATION, **overrides}, params, gflops, err)


_BASELINE = AblationRow("ResNet-50", "resnet50", {"style": "caffe"}, 25.6, 3.86, (23.30, 6.55))

PAPER_TABLES: dict[str, tuple[str, list[AblationRow]]] = {
    "10": (
        "Table 10: reduction ratio r",
        [
            _se("r=2", 45.7, None, (22.29, 6.00), se_reduction=2),
            _se("r=4", 35.7, None, (22.25, 6.09), se_reduction=4),
            _se("r=8", 30.7, None, (22.26, 5.99), se_reduction=8),
            _se("r=16", 28.1, 3.87, (22.28, 6.03), se_reduction=16),
            _se("r=32", 26.9, None, (22.72, 6.20), se_reduction=32),
            _BASELINE,
        ],
    ),
    "11": (
        "Table 11: squeeze operator",
        [_se("max", None, None, (22.57, 6.09), se_squeeze="max"), _se("avg", None, None, (22.28, 6.03))],
    ),
    "12": (
        "Table 12: excitation non-linearity",
        [
            _se("relu", None, None, (23.47, 6.98), se_gate="relu"),
            _se("tanh", None, None, (23.00, 6.38), se_gate="tanh"),
            _se("sigmoid", None, None, (22.28, 6.03)),
        ],
    ),
    "13": (
        "Table 13: stages with SE",
        [
            _BASELINE,
            _se("SE_Stage_2", 25.6, 3.86, None, se_stages=(2,)),
            _se("SE_Stage_3", 25.7, 3.86, None, se_stages=(3,)),
            _se("SE_Stage_4", 26.4, 3.86, None, se_stages=(4,)),
            _se("SE_All", 28.1, 3.87, None),
        ],
    ),
    "14": (
        "Table 14: SE integration",
        [
            _se("SE", None, None, (22.28, 6.03)),
            _se("SE-PRE", None, None, (22.23, 6.00), se_placement="pre"),
            _se("SE-POST", None, None, (22.78, 6.35), se_placement="post"),
            _se("SE-Identity", None, None, (22.20, 6.15), se_placement="identity"),
        ],
    ),
    "15": (
        "Table 15: SE inside the residual unit",
        [_se("SE", 28.1, 3.87, (22.28, 6.03)), _se("SE_3x3", 25.8, 3.86, (22.48, 6.02), se_placement="3x3")],
    ),
    "16": (
        "Table 16: no squeeze",
        [_se("NoSqueeze", 28.1, 4.27, (22.93, 6.39), se_squeeze="none"), _se("SE", 28.1, 3.87, (22.28, 6.03))],
    ),
    "last": (
        "Removing SE from the last stage",
        [_se("SE all stages", 28.1, 3.87), _se("no SE in res5", None, None, se_stages=(2, 3, 4)), _BASELINE],
    ),
}
