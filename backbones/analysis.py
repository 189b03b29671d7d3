"""The SENet paper's look inside a trained network (Section 7.2, Fig. 6 and 7), on the modules of any model here.

- `se_blocks(model)`: the SE blocks under the paper's names, SE_<stage>_<block>: stage 2..5 is layer1..layer4
  of an ImageNet network (2..4 for the CIFAR ones), blocks count from 1, so SE-ResNet-50 has SE_2_1 .. SE_5_3;
- `paper_blocks(names)`: the blocks the paper plots, the last of every stage and all of the last stage
  (SE_2_3, SE_3_4, SE_4_6, SE_5_1, SE_5_2, SE_5_3 for SE-ResNet-50);
- `ExcitationRecorder`: forward hooks that collect the excitation (the gate's output, one value per channel) per
  class, as running sums, so ImageNet's 50k images x 2048 channels never sit in memory;
- `without_se(model, ...)`: a copy with chosen SE blocks replaced by the identity (excitation fixed to 1), for
  the paper's pruning experiment, and `se_parameters` for its parameter count.

Nothing here reads data or files; classification/excitation.py runs it over a dataset and draws the figures.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .models.se import SqueezeExcite

_NAME = re.compile(r"SE_(\d+)_(\d+)")


def se_blocks(model: nn.Module) -> dict[str, SqueezeExcite]:
    """{"SE_2_1": block, ...} in forward order; units without SE (or with it replaced) are left out."""
    return {name: se for name, _, _, se in _se_slots(model)}


def _se_slots(model: nn.Module):
    """(name, unit, attribute, block) of every SE block: where it sits, so that it can be replaced."""
    i = 1
    while isinstance(layer := getattr(model, f"layer{i}", None), nn.Sequential):
        for j, unit in enumerate(layer, start=1):
            for attr in ("se", "se_3x3"):  # the "3x3" placement keeps its block under its own name
                se = getattr(unit, attr, None)
                if isinstance(se, SqueezeExcite):
                    yield f"SE_{i + 1}_{j}", unit, attr, se
        i += 1


def stage_of(name: str) -> int:
    match = _NAME.fullmatch(name)
    if match is None:
        raise ValueError(f"{name!r} is not an SE block name (SE_<stage>_<block>, e.g. SE_5_2)")
    return int(match.group(1))


def paper_blocks(names: Iterable[str]) -> list[str]:
    """The blocks of Fig. 6 and 7: the last SE block of every stage, and every SE block of the last stage."""
    names = list(names)
    if not names:
        return []
    last_stage = max(map(stage_of, names))
    last_of = {stage_of(n): n for n in names}  # names are in forward order: the last one wins
    return [n for n in names if stage_of(n) == last_stage or last_of[stage_of(n)] == n]


def select_blocks(names: Iterable[str], wanted: Iterable[str] | None) -> list[str]:
    """`wanted` resolved against the model's `names`: SE block names, or stage numbers ("5": all of stage 5).

    None gives `paper_blocks`. An unknown name is refused, naming what the model has.
    """
    names = list(names)
    if wanted is None:
        return paper_blocks(names)
    chosen: list[str] = []
    for item in wanted:
        matches = [n for n in names if stage_of(n) == int(item)] if str(item).isdigit() else [item] * (item in names)
        if not matches:
            raise ValueError(f"no SE block {item!r} in this model; it has {', '.join(names) or 'none'}")
        chosen += [m for m in matches if m not in chosen]
    return chosen


def sampled_channels(channels: int, count: int = 50) -> np.ndarray:
    """`count` channel indices spread evenly over 0..channels-1 (the paper plots 50), all when there are fewer."""
    return np.unique(np.linspace(0, channels - 1, min(count, channels)).round().astype(int))


@dataclass
class ExcitationStats:
    """Per block: `mean[block]`, `std[block]` (num_classes, C) over each class's images (classes without images
    hold NaN), `all_mean[block]`, `all_std[block]` (C,) over every image; `counts` (num_classes,) images per
    class. Standard deviations are the population's (divided by the count)."""

    blocks: list[str]
    counts: np.ndarray
    mean: dict[str, np.ndarray]
    std: dict[str, np.ndarray]
    all_mean: dict[str, np.ndarray]
    all_std: dict[str, np.ndarray]

    def arrays(self) -> dict[str, np.ndarray]:
        """Flat {"counts", "<block>/mean", ...} for np.savez."""
        out = {"counts": self.counts}
        for b in self.blocks:
            for key, table in (("mean", self.mean), ("std", self.std), ("all_mean", self.all_mean)):
                out[f"{b}/{key}"] = table[b]
            out[f"{b}/all_std"] = self.all_std[b]
        return out


class ExcitationRecorder:
    """Collects the excitation of the named SE blocks of `model` while it runs; use as a context manager.

        with ExcitationRecorder(model, ["SE_5_2"], num_classes) as rec:
            for images, labels in batches:
                model(images)
                rec.add(labels)
        stats = rec.stats()

    The excitation is the gate's output, (N, C) per block: the hook sits on the block's second FC and applies
    the block's own gate to it. A NoSqueeze block (Table 16) excites every position: its map is averaged.
    """

    def __init__(self, model: nn.Module, blocks: Iterable[str], num_classes: int):
        available = se_blocks(model)
        self.blocks = list(blocks)
        missing = [b for b in self.blocks if b not in available]
        if missing:
            raise ValueError(f"no SE block {missing} in this model; it has {', '.join(available) or 'none'}")
        self.modules = {b: available[b] for b in self.blocks}
        self.num_classes = num_classes
        self.counts = torch.zeros(num_classes, dtype=torch.float64)
        self.sums: dict[str, torch.Tensor] = {}
        self.squares: dict[str, torch.Tensor] = {}
        self.batch: dict[str, torch.Tensor] = {}
        self.handles: list = []

    def __enter__(self) -> ExcitationRecorder:
        for name, se in self.modules.items():
            self.handles.append(se.fc2.register_forward_hook(self._hook(name, se)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _hook(self, name: str, se: SqueezeExcite):
        def hook(module: nn.Module, inputs, output: torch.Tensor) -> None:
            self.batch[name] = se._gate(output.detach()).mean((2, 3)).to("cpu", torch.float64)

        return hook

    def add(self, labels: torch.Tensor) -> None:
        """Count the excitations of the last forward pass under their images' `labels` (N,)."""
        labels = labels.to("cpu", torch.int64)
        missing = [b for b in self.blocks if b not in self.batch]
        if missing:
            raise RuntimeError(f"no excitation recorded for {missing}: run the model between add() calls")
        self.counts.index_add_(0, labels, torch.ones(len(labels), dtype=torch.float64))
        for name in self.blocks:
            e = self.batch.pop(name)
            if len(e) != len(labels):
                raise ValueError(f"{len(labels)} labels for a batch of {len(e)} images")
            if name not in self.sums:
                self.sums[name] = torch.zeros(self.num_classes, e.shape[1], dtype=torch.float64)
                self.squares[name] = torch.zeros_like(self.sums[name])
            self.sums[name].index_add_(0, labels, e)
            self.squares[name].index_add_(0, labels, e * e)

    def stats(self) -> ExcitationStats:
        if not self.sums:
            raise RuntimeError("no images were recorded")
        counts = self.counts.numpy()
        mean, std, all_mean, all_std = {}, {}, {}, {}
        with np.errstate(invalid="ignore", divide="ignore"):  # classes without images: NaN
            for name in self.blocks:
                s, q = self.sums[name].numpy(), self.squares[name].numpy()
                mean[name] = s / counts[:, None]
                std[name] = np.sqrt(np.maximum(q / counts[:, None] - mean[name] ** 2, 0))
                all_mean[name] = s.sum(0) / counts.sum()
                all_std[name] = np.sqrt(np.maximum(q.sum(0) / counts.sum() - all_mean[name] ** 2, 0))
        return ExcitationStats(list(self.blocks), counts, mean, std, all_mean, all_std)


def without_se(model: nn.Module, blocks: Iterable[str]) -> nn.Module:
    """A deep copy of `model` whose named SE blocks are the identity: the unit scales by 1, so only the branch
    and the shortcut remain, as in a plain ResNet unit (the paper's "removing the SE blocks" of a stage)."""
    pruned = copy.deepcopy(model)
    wanted = set(blocks)
    slots = list(_se_slots(pruned))
    unknown = wanted - {name for name, *_ in slots}
    if unknown:
        raise ValueError(f"no SE block {sorted(unknown)} in this model")
    for name, unit, attr, _ in slots:
        if name in wanted:
            setattr(unit, attr, nn.Identity())
    return pruned


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def se_parameters(model: nn.Module, blocks: Iterable[str] | None = None) -> int:
    """Parameters of the named SE blocks (all of them by default)."""
    found = se_blocks(model)
    return sum(count_parameters(found[b]) for b in (found if blocks is None else blocks))
