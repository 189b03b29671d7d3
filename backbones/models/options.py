"""The SE options as one object, from a config or a command line down to every SE block, and the option checks.

`SEOptions` is what a model constructor takes (`ResNet(se=SEOptions(reduction=8))`; None builds no SE block).
Configs, command lines and our checkpoint records spell the same options flat, as `se=True, se_reduction=8`
(`create_model("se_resnet50", se_reduction=8)`, `--set se_reduction=8`, detectron2's MODEL.SENET.REDUCTION):
`SEOptions.from_flat` / `to_flat` are the one translation between the two spellings.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, TypeVar

T = TypeVar("T")

SQUEEZES = ("avg", "max", "none")
GATES = ("sigmoid", "tanh", "relu")
PLACEMENTS = ("standard", "pre", "post", "identity", "3x3")
STAGES = (2, 3, 4, 5)  # res2..res5 of the ImageNet networks
FLAT_PREFIX = "se_"


def check_choice(name: str, value: T, choices: Collection) -> T:
    """`value` if it is one of `choices`, else a ValueError that lists them (the models' option checks)."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")
    return value


@dataclass(frozen=True)
class SEOptions:
    """How the SE blocks of a network are built and where they sit.

    reduction: r, the excitation squeezes C channels to C / r (Table 10).
    squeeze: "avg" global pooling (the paper), "max" (Table 11) or "none" (Table 16, NoSqueeze).
    gate: "sigmoid" (the paper), "tanh" or "relu" (Table 12).
    bias: biases on the two excitation FCs (the released models have them, the paper's ablations not).
    divisor: C / r rounded to a multiple of this (timm and mmpretrain weights use 8).
    placement: "standard" (residual branch, before the sum), "pre", "post", "identity" (Table 14) or "3x3"
        (after the 3x3 conv inside the branch, Table 15).
    stages: the stages with SE blocks, among 2..5 = res2..res5 (Table 13).
    """

    reduction: float = 16
    squeeze: str = "avg"
    gate: str = "sigmoid"
    bias: bool = True
    divisor: int = 1
    placement: str = "standard"
    stages: tuple[int, ...] = STAGES

    def __post_init__(self) -> None:
        check_choice("se squeeze", self.squeeze, SQUEEZES)
        check_choice("se gate", self.gate, GATES)
        check_choice("se placement", self.placement, PLACEMENTS)
        if not self.reduction > 0 or self.divisor < 1:
            raise ValueError(f"se reduction ({self.reduction}) must be > 0 and se divisor ({self.divisor}) >= 1")
        object.__setattr__(self, "stages", tuple(self.stages))  # a list from a config file is fine too
        bad = sorted(set(self.stages) - set(STAGES))
        if bad:
            raise ValueError(f"se stages {bad} are not among the stages {STAGES} (res2..res5)")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_flat(cls, options: Mapping[str, Any], supported: Collection[str] | None = None) -> SEOptions | None:
        """SEOptions from flat options (`se` on/off plus `se_<field>`), or None when `se` is false.

        `se` may also be an SEOptions already (returned with the flat fields applied on top). Fields outside
        `supported` (the ones a model has: the CIFAR networks have no placement, stages or divisor) are refused.
        """
        flat = {k[len(FLAT_PREFIX) :]: v for k, v in options.items() if k.startswith(FLAT_PREFIX)}
        unknown = sorted(set(flat) - set(supported if supported is not None else cls.names()))
        if unknown:
            raise ValueError(f"unknown SE option(s) {[FLAT_PREFIX + k for k in unknown]}")
        base = options.get("se", False)
        if not base:
            return None
        return replace(base, **flat) if isinstance(base, SEOptions) else cls(**flat)

    def to_flat(self) -> dict[str, Any]:
        """{"se": True, "se_reduction": 16, ...}: the spelling of configs, command lines and checkpoint records."""
        return {"se": True, **{FLAT_PREFIX + key: value for key, value in asdict(self).items()}}
