"""detectron2's own tools (tools/analyze_model.py, tools/deploy/export_model.py...) on this add-on's configs.

Those tools build their config with `detectron2.config.get_cfg()` and load MODEL.WEIGHTS with
`DetectionCheckpointer`, so a project's config keys (our MODEL.SENET) are unknown to them; detectron2's projects
edit the tool to call their `add_*_config` (export_model.py calls `add_pointrend_config`). `patched_for_tools()`
does that without an edit, for as long as it is active: `get_cfg()` includes MODEL.SENET, `DetectionCheckpointer`
is `SENetCheckpointer` (MODEL.WEIGHTS may be one of our ImageNet checkpoints, as in tools/train_net.py), and
`detectron2.utils.analysis.FlopCountAnalysis` counts the SE block's ops (`analysis.SE_FLOP_HANDLES`).
`run_tool(tool, argv)` runs a tool script under it: what tools/d2_tool.py does from the command line.
"""

from __future__ import annotations

import contextlib
import runpy
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import detectron2
import detectron2.checkpoint
import detectron2.config
import detectron2.utils.analysis

from .analysis import FlopCountAnalysis
from .checkpoint import SENetCheckpointer
from .config import add_senet_config


@contextlib.contextmanager
def patched_for_tools() -> Iterator[None]:
    """detectron2's `get_cfg`, `DetectionCheckpointer` and `FlopCountAnalysis` replaced by ours, then restored.

    A tool picks them up when it imports them (`from detectron2.config import get_cfg`), so the tool must be
    imported or run inside the block."""
    base_get_cfg = detectron2.config.get_cfg
    patches = {
        (detectron2.config, "get_cfg"): lambda: add_senet_config(base_get_cfg()),
        (detectron2.checkpoint, "DetectionCheckpointer"): SENetCheckpointer,
        (detectron2.utils.analysis, "FlopCountAnalysis"): FlopCountAnalysis,
    }
    saved = {key: getattr(*key) for key in patches}
    try:
        for (module, name), value in patches.items():
            setattr(module, name, value)
        yield
    finally:
        for (module, name), value in saved.items():
            setattr(module, name, value)


def find_tool(tool: str) -> Path:
    """A tool script: its path, or the name of a tool in the tools/ folder installed with detectron2 (pip puts
    detectron2's tools/ beside the package: analyze_model, benchmark, ...; a source checkout also has deploy/)."""
    path = Path(tool)
    if path.is_file():
        return path
    root = Path(detectron2.__file__).resolve().parents[1] / "tools"
    for candidate in (root / f"{tool}.py", root / "deploy" / f"{tool}.py"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{tool}: no such script, and no {tool}.py among detectron2's installed tools in {root}; give the path of "
        "the tool in a detectron2 checkout, e.g. detectron2/tools/deploy/export_model.py"
    )


def run_tool(tool: str, argv: Sequence[str]) -> None:
    """Run detectron2 tool `tool` (`find_tool`) as its own command line with `argv`, under `patched_for_tools`."""
    script = find_tool(tool)
    saved_argv = sys.argv
    sys.argv = [str(script), *argv]
    try:
        with patched_for_tools():
            runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = saved_argv
