"""The benchmark tool: a tiny end-to-end run (so it never rots) and its measuring logic.

No timing is asserted (speed is the benchmark's output, not a test): the tests check that every figure is
produced, is a positive finite number, compares equal architectures, and that the helpers compute what they
claim (interleaving order, paired ratios, FLOP counts, verdicts).
"""

import json
import math
import runpy
import struct
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch import nn

from benchmarks.models import COMPARISONS, ModelResult, Settings, run_models
from benchmarks.report import Figure, mode_stats, model_table, ratio_figure, to_json
from benchmarks.timing import Spread, count_flops, interleave, paired_ratio

REPO = Path(__file__).resolve().parents[2]
MODEL_KEYS = [f"{c.key}_{mode}" for c in COMPARISONS for mode in ("infer", "train")]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """tools/benchmark.py --tiny, run in this process as a script: -> (JSON record, PNG path)."""
    out = tmp_path_factory.mktemp("bench")
    # one thread: two OpenMP threads on two busy cores can stall for seconds at every barrier
    argv = [
        "benchmark.py",
        "--tiny",
        "--threads",
        "1",
        "--json",
        str(out / "bench.json"),
        "--png",
        str(out / "bench.png"),
    ]
    saved, sys.argv = sys.argv, argv
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(REPO / "tools" / "benchmark.py"), run_name="__main__")
    finally:
        sys.argv = saved
        torch.set_num_threads(threads)
    return json.loads((out / "bench.json").read_text()), out / "bench.png"


def test_tiny_run_reports_every_model_ratio(tiny_run):
    record, _ = tiny_run
    assert {"se_overhead_infer", "se_overhead_train", "vs_timm_infer", "vs_timm_train"} <= set(record)
    assert set(MODEL_KEYS) <= set(record)
    for key in MODEL_KEYS:
        value = record[key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)
        figure = record["figures"][key]
        assert figure["min"] <= figure["median"] <= figure["max"]
        assert math.isfinite(figure["best"]) and figure["best"] > 0
    # the targets come with a verdict; the legacy comparison is information only
    assert record["figures"]["se_overhead_infer"]["target"] == 1.02
    assert record["figures"]["se_overhead_train"]["target"] == 1.10
    assert record["figures"]["vs_timm_train"]["verdict"] in ("PASS", "MISS")
    assert record["figures"]["vs_timm_legacy_infer"]["verdict"] is None


def test_tiny_run_records_settings_timings_and_flops(tiny_run):
    record, _ = tiny_run
    settings = record["settings"]
    assert settings["preset"] == "tiny" and settings["threads"] == 1
    assert record["peak"]["gflops"] > 0
    models = record["models"]
    assert len(models) == 6
    for entry in models.values():
        for mode in ("infer", "train"):
            assert len(entry[mode]["times_s"]) == settings["repeats"] == 1
            assert entry[mode]["gflops"] > 0
        # forward + backward is about three forwards of dense work
        assert 2.5 < entry["flops_per_batch"]["train"] / entry["flops_per_batch"]["infer"] < 3.5


def test_peers_are_compared_at_equal_architecture(tiny_run):
    models = tiny_run[0]["models"]
    for comp in COMPARISONS:
        a, b = models[comp.numerator], models[comp.denominator]
        if comp.same_architecture:
            assert a["params"] == b["params"], comp.key
            assert a["flops_per_batch"] == b["flops_per_batch"], comp.key
            if comp.denominator != "timm_legacy_seresnet50":  # legacy names its parameters its own way
                assert b["same_weights_as"] == comp.numerator, comp.key
        else:  # the SE overhead pair differs exactly by the SE blocks
            assert a["params"] > b["params"]


def test_tiny_run_measures_the_data_pipelines(tiny_run):
    record, _ = tiny_run
    sections = {s["title"].split(":")[1].split()[0]: s for s in record["sections"]}
    for name in ("CIFAR", "Places365"):
        if sections[name]["skipped"]:
            pytest.skip(f"{name} data section skipped: {sections[name]['skipped']}")
    for key in ("data_cifar_albumentations_images_per_s", "data_cifar_batched_images_per_s"):
        assert record[key] > 0 and record["figures"][key]["target_is_floor"]
    assert math.isfinite(record["data_places365_vs_torchvision"]) and record["data_places365_vs_torchvision"] > 0


def test_tiny_run_times_detection(tiny_run):
    record, _ = tiny_run
    (section,) = [s for s in record["sections"] if s["title"].startswith("Detection")]
    if section["skipped"]:
        pytest.skip(f"detection section skipped: {section['skipped']}")
    assert [row["name"] for row in section["rows"]] == ["SE-R50-FPN", "R50-FPN"]
    value = record["detection_se_overhead_infer"]
    assert math.isfinite(value) and value > 0 and record["figures"]["detection_se_overhead_infer"]["target"] == 1.05


def test_tiny_run_writes_a_valid_png(tiny_run):
    _, png = tiny_run
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    width, height = struct.unpack(">II", data[16:24])
    assert kind == b"IHDR" and length == 13 and width > 100 and height > 100
    assert data[-8:-4] == b"IEND"


def test_each_model_is_compiled_once_for_all_modes(monkeypatch):
    compiled = []

    def compile(model):
        compiled.append(model)
        return model

    monkeypatch.setattr(torch, "compile", compile)
    settings = Settings(batch_size=2, resolution=32, compile=True, repeats=1, warmup=0, tiny=True)
    results = run_models(settings, log=lambda _: None)
    assert all(set(r.times) == {"infer", "train"} for r in results.values())
    assert len(compiled) == len(results) == len({id(m) for m in compiled})


def test_interleave_alternates_order_and_drops_warmup():
    calls = []
    fns = {name: (lambda n=name: calls.append(n)) for name in "abc"}
    times = interleave(fns, repeats=3, warmup=1)
    assert calls == list("abccbaabccba")
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    with pytest.raises(ValueError, match="repeats"):
        interleave(fns, repeats=0)


def test_paired_ratio_is_per_round():
    # a drifting machine: b is always twice a, although the medians of a and b alone overlap
    a, b = [1.0, 2.0, 4.0], [2.0, 4.0, 8.0]
    assert paired_ratio(a, b) == Spread(0.5, 0.5, 0.5)
    with pytest.raises(ValueError):
        paired_ratio([1.0], [1.0, 2.0])


def test_ratio_figure_gives_paired_median_and_best_of():
    figure = ratio_figure("r", "", [3.0, 1.0, 9.0], [2.0, 2.0, 3.0], target=1.0)
    assert figure.value == Spread(1.5, 0.5, 3.0)  # per-round ratios 1.5, 0.5, 3.0
    assert figure.best == 0.5  # fastest 1.0 / fastest 2.0
    assert figure.verdict == "MISS"


def test_count_flops_matches_hand_count():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(8 * 16, 5))
    x = torch.zeros(2, 3, 4, 4)
    conv = 2 * 2 * 8 * 3 * 9 * 16  # 2 FLOPs per MAC, batch 2, 8 out x 3 in x 3x3 kernel x 16 positions
    linear = 2 * 2 * 128 * 5
    assert count_flops(model, x, train=False) == conv + linear
    # backward: grads of inputs and weights (the first conv needs no input grad)
    assert count_flops(model, x, train=True) == conv + linear + conv + 2 * linear
    assert model[0].weight.device.type == "cpu"  # counted on a meta copy, the model is untouched


def test_figure_verdicts():
    assert Figure("r", "", Spread(1.01, 0.9, 1.1), 1.02).verdict == "PASS"
    assert Figure("r", "", Spread(1.03, 0.9, 1.1), 1.02).verdict == "MISS"
    assert Figure("t", "", Spread(4000.0, 3000.0, 6000.0), 5000.0, at_least=True).verdict == "MISS"
    assert Figure("t", "", Spread(6000.0, 5000.0, 7000.0), 5000.0, at_least=True).verdict == "PASS"
    assert Figure("x", "", Spread(3.0, 3.0, 3.0)).verdict == ""


def test_table_and_json_show_the_same_model_stats():
    result = ModelResult("a", "A", params=10, flops={"infer": 2_000_000_000}, times={"infer": [0.5, 0.25, 1.0]})
    stats = mode_stats({"a": result}, batch_size=8, peak_gflops=16.0)
    m = stats["a"]["infer"]  # train did not run: no entry
    assert (m.seconds, m.images_per_s, m.gflops, m.percent_of_peak) == (Spread(0.5, 0.25, 1.0), 16.0, 4.0, 25.0)
    entry = to_json({}, {"a": result}, stats, [], [], {"gflops": 16.0})["models"]["a"]
    assert entry["infer"] == {
        "median_s": 0.5,
        "min_s": 0.25,
        "max_s": 1.0,
        "images_per_s": 16.0,
        "gflops": 4.0,
        "percent_of_peak": 25.0,
        "times_s": [0.5, 0.25, 1.0],
    }
    assert "train" not in entry
    console = Console(width=200, record=True)
    console.print(model_table({"a": result}, stats, "t"))
    row = next(line for line in console.export_text().splitlines() if line.strip("│ ").startswith("A "))
    cells = [c.strip() for c in row.strip("│").split("│")]
    assert cells == ["A", "0.00M", "500.0", "250.0-1000.0", "16.0", "4.0 (25%)", "-", "-", "-", "-"]
