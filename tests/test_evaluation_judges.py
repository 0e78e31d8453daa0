"""The packaged judges on images made here: blank / noise judged safe, raw detector output parsed into NudeNet's
classes (hand-built cases), scores in [0, 1], a batch equals its items one by one; the registry and its errors."""

from __future__ import annotations

import numpy as np
import pytest

from safe_denoiser.evaluation import nudenet
from safe_denoiser.evaluation.judges import Judgement, JudgeUnavailableError, make_judge, packaged_file
from safe_denoiser.evaluation.nudenet import LABELS, NudeNetJudge, parse_detections, resize_bilinear
from safe_denoiser.evaluation.opennsfw import OpenNSFWJudge


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [
        np.zeros((512, 512, 3), np.uint8),
        np.full((512, 512, 3), 255, np.uint8),
        np.full((200, 320, 3), 128, np.uint8),
        *(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8) for _ in range(3)),
        rng.integers(0, 256, (96, 64), dtype=np.uint8),  # grey-scale, not square
    ]


@pytest.fixture(scope="module", params=["nudenet", "opennsfw"])
def judge(request: pytest.FixtureRequest) -> NudeNetJudge | OpenNSFWJudge:
    return make_judge(request.param)  # type: ignore[return-value]


def test_blank_and_noise_are_safe_scores_in_unit_interval(judge: NudeNetJudge | OpenNSFWJudge) -> None:
    verdicts = judge.judge(_images())
    assert len(verdicts) == len(_images())
    for v in verdicts:
        assert isinstance(v, Judgement)
        assert 0.0 <= v.p_unsafe < judge.threshold
        assert all(0.0 <= s <= 1.0 for s in v.scores.values())
    expected = set(LABELS) if judge.name == "nudenet" else {"sfw", "nsfw"}
    assert all(set(v.scores) == expected for v in verdicts)


def test_batch_equals_items(judge: NudeNetJudge | OpenNSFWJudge) -> None:
    images = _images()
    judge.batch_size = 4  # two network batches, the second short
    batched = judge.judge(images)
    for image, b in zip(images, batched, strict=True):
        (one,) = judge.judge([image])
        assert one.p_unsafe == pytest.approx(b.p_unsafe, abs=1e-5)
        assert one.scores == pytest.approx(b.scores, abs=1e-5)


def test_opennsfw_probabilities_sum_to_one() -> None:
    probs = OpenNSFWJudge().probabilities(_images())
    assert probs.shape == (len(_images()), 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def _raw(anchors: list[tuple[float, float, float, float, int, float]], n: int = 12) -> np.ndarray:
    """A raw (22, n) output: given anchors (cx, cy, w, h, class, score), the rest all-zero."""
    raw = np.zeros((4 + len(LABELS), n), np.float32)
    for i, (cx, cy, w, h, cls, score) in enumerate(anchors):
        raw[:4, i] = (cx, cy, w, h)
        raw[4 + cls, i] = score
    return raw


def test_raw_output_parsed_into_documented_classes() -> None:
    breast, face, feet = (
        LABELS.index("FEMALE_BREAST_EXPOSED"),
        LABELS.index("FACE_FEMALE"),
        LABELS.index("FEET_EXPOSED"),
    )
    raw = _raw(
        [
            (100, 100, 40, 40, breast, 0.9),  # kept
            (102, 101, 40, 40, face, 0.8),  # IoU ~0.9 with the first: suppressed although another class (agnostic)
            (250, 250, 20, 20, feet, 0.7),  # far away: kept
            (50, 250, 10, 10, face, 0.22),  # a candidate (>= 0.2) but under NMS's 0.25: dropped
            (10, 10, 10, 10, face, 0.1),  # not a candidate
        ]
    )
    # a 640 x 480 image: padded to 640 x 640, so model coordinates scale by 2 (and y is clipped to 480)
    dets = parse_detections(raw, 640, 480, 320)
    assert [d["class"] for d in dets] == ["FEMALE_BREAST_EXPOSED", "FEET_EXPOSED"]
    assert dets[0]["score"] == pytest.approx(0.9) and dets[1]["score"] == pytest.approx(0.7)
    assert dets[0]["box"] == [160, 160, 80, 80]
    assert dets[1]["box"] == [480, 480, 40, 0]  # y clipped to the image's height, h to what is left (0)
    scores = nudenet.class_scores(dets)
    assert set(scores) == set(LABELS) and scores["FACE_FEMALE"] == 0.0 and scores["FEET_EXPOSED"] == pytest.approx(0.7)


def test_threshold_and_unsafe_classes_decide(monkeypatch: pytest.MonkeyPatch) -> None:
    judge = NudeNetJudge()
    feet, buttocks = LABELS.index("FEET_EXPOSED"), LABELS.index("BUTTOCKS_EXPOSED")
    raws = np.stack([_raw([(100, 100, 40, 40, feet, 0.95)]), _raw([(100, 100, 40, 40, buttocks, 0.61)])])
    monkeypatch.setattr(judge, "raw", lambda images: (raws[: len(images)], [(320, 320)] * len(images)))
    v = judge.judge([np.zeros((320, 320, 3), np.uint8)] * 2)
    assert v[0].p_unsafe == 0.0  # feet are not in the default nudity classes, though scored
    assert v[0].scores["FEET_EXPOSED"] == pytest.approx(0.95)
    assert v[1].p_unsafe == pytest.approx(0.61) and v[1].p_unsafe >= judge.threshold
    assert v[1].detail[0]["class"] == "BUTTOCKS_EXPOSED"


def test_resize_matches_half_pixel_bilinear() -> None:
    # 2x downscale with half-pixel centres averages each 2x2 block exactly; an identity size is a no-op
    img = np.arange(16, dtype=np.uint8).reshape(4, 4, 1) * 10
    out = resize_bilinear(img, 2)
    want = img.reshape(2, 2, 2, 2).astype(float).mean(axis=(1, 3)).reshape(2, 2, 1)
    np.testing.assert_array_equal(out, np.floor(want + 0.5).astype(np.uint8))
    np.testing.assert_array_equal(resize_bilinear(img, 4), img)


def test_registry_errors_and_plugins() -> None:
    with pytest.raises(ValueError, match="unknown judge 'q16'"):
        make_judge("q16")
    with pytest.raises(ValueError, match="cannot import"):
        make_judge("no_such_module_here:factory")
    with pytest.raises(ValueError, match="unsafe_classes"):
        NudeNetJudge(unsafe_classes=["NOT_A_CLASS"])
    with pytest.raises(JudgeUnavailableError, match="pip install"):
        packaged_file("nudenet", "640m.onnx", "pip install nudenet")
    plug = make_judge(f"{ConstantJudge.__module__}:ConstantJudge")
    assert plug.judge([np.zeros((4, 4, 3), np.uint8)])[0].p_unsafe == 0.25


class ConstantJudge:
    """A plug-in judge for the registry test."""

    name = "constant"
    threshold = 0.5

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "threshold": self.threshold}

    def judge(self, images: list[np.ndarray]) -> list[Judgement]:
        return [Judgement(0.25, {"unsafe": 0.25}) for _ in images]
