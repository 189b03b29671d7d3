"""FLOP counts with fvcore / detectron2 that include the SE block's own operations.

fvcore counts convolutions and matrix products (one "flop" per multiply-accumulate), and detectron2's
`FlopCountAnalysis` ignores elementwise ops on purpose (add, mul, sigmoid...). The SE block's squeeze (a sum over
H and W) and scale (x * s) are elementwise work that the paper's GFLOPs include (3.86 -> 3.87 for ResNet-50), so
`SE_FLOP_HANDLES` counts them as `backbones.complexity` does: one per element squeezed or scaled. Traced (fvcore
counts a traced graph), the SE unit records `residual + x * scale`: the scale is an `aten::mul`; the residual
sum, an add, stays uncounted as in every ResNet. Other muls of a detector are counted too (box decoding: a few
thousand numbers against billions).
"""

from __future__ import annotations

from math import prod

from detectron2.utils import analysis
from fvcore.nn.jit_handles import elementwise_flop_counter, get_shape


def _output_elements(inputs, outputs) -> int:
    """One per element of the result; none for 0-dim results (traced shape arithmetic such as H * W)."""
    shape = get_shape(outputs[0])
    return prod(shape) if shape else 0


SE_FLOP_HANDLES = {
    "aten::sum": elementwise_flop_counter(1, 0),  # squeeze "avg": sum / (H * W), one per element summed
    "aten::amax": elementwise_flop_counter(1, 0),  # squeeze "max"
    "aten::mean": elementwise_flop_counter(1, 0),
    "aten::mul": _output_elements,  # scale
    "aten::addcmul": _output_elements,  # scale and residual sum in one op (the SE's eager form)
}


class FlopCountAnalysis(analysis.FlopCountAnalysis):
    """detectron2's `FlopCountAnalysis` (any detectron2 model and inputs) with `SE_FLOP_HANDLES` added."""

    def __init__(self, model, inputs):
        super().__init__(model, inputs)
        self.set_op_handle(**SE_FLOP_HANDLES)
