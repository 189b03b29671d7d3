"""What the detection tests of both engines compare: COCO-format detections (the JSON list COCO results files
hold) and flat metric dicts, one against the other."""

import pytest


def assert_same_detections(one: list[dict], two: list[dict], *, images: int, score: float, box: float) -> None:
    """The same detections, whatever their order: per image and class, scores within `score`, boxes within `box`
    pixels; `images` images have detections."""
    key = lambda d: (d["image_id"], d["category_id"], -d["score"], d["bbox"])  # noqa: E731
    one, two = sorted(one, key=key), sorted(two, key=key)
    assert len({d["image_id"] for d in one}) == images and len(one) == len(two)
    for a, b in zip(one, two, strict=True):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        assert b["score"] == pytest.approx(a["score"], abs=score)
        assert b["bbox"] == pytest.approx(a["bbox"], abs=box)


def assert_same_metrics(one: dict, two: dict) -> None:
    """The same metric names; every value equal to 1e-6, or None (an AP COCOeval cannot compute) in both."""
    assert one.keys() == two.keys() and one
    for name, value in one.items():
        assert two[name] == (None if value is None else pytest.approx(value, abs=1e-6)), name
