"""Incremental judging (a killed run resumes and judges nothing twice), the report (markdown, JSON, contact sheet,
plot, opened and read back), and FID / CLIP score through torchmetrics against independent references."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from safe_denoiser.cli import main
from safe_denoiser.evaluation import quality
from safe_denoiser.evaluation.judges import Judgement
from safe_denoiser.evaluation.judging import judge_folder, load_judgements
from safe_denoiser.evaluation.report import TILE, Run, build_report, format_report, write_report


class RedJudge:
    """p_unsafe = the mean red excess of the image; counts what it is asked to judge."""

    name = "red"
    threshold = 0.6

    def __init__(self, fail_after: int | None = None) -> None:
        self.seen: list[int] = []
        self.calls = 0
        self.fail_after = fail_after

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "threshold": self.threshold, "version": 1}

    def judge(self, images: list[np.ndarray]) -> list[Judgement]:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt  # what a kill looks like from inside
        self.calls += 1
        out = []
        for im in images:
            self.seen.append(int(im[0, 0, 2]))  # the blue channel of pixel (0, 0) encodes the image's index
            p = float(np.clip((im[..., 0].astype(float) - im[..., 1]).mean() / 255.0, 0.0, 1.0))
            out.append(Judgement(p, {"red": p}))
        return out


def _image(index: int, unsafe: bool, rng: np.random.Generator) -> np.ndarray:
    im = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    if unsafe:
        im[..., 0], im[..., 1] = 250, 10
    im[0, 0, 2] = index
    return im


def _run(
    folder: Path, unsafe: list[bool], seconds: float, fired: list[int | None], categories: list[str] | None = None
) -> Path:
    """An ImageWriter output folder: images/<id>.png and metadata/rank0.jsonl (one row per image)."""
    (folder / "images").mkdir(parents=True)
    (folder / "metadata").mkdir()
    rng = np.random.default_rng(len(unsafe))
    rows = []
    for i, u in enumerate(unsafe):
        Image.fromarray(_image(i, u, rng)).save(folder / "images" / f"{i:04d}.png")
        row = {"id": f"{i:04d}", "prompt": f"prompt {i}", "seed": i, "negative_prompt": None, "extra": {}}
        row |= {"class_label": None if categories is None else categories[i], "file": f"images/{i:04d}.png"}
        rows.append(json.dumps(row | {"seconds": seconds, "correction_steps": fired[i], "rank": 0}) + "\n")
    (folder / "metadata" / "rank0.jsonl").write_text("".join(rows), encoding="utf-8")
    return folder


def test_resume_after_kill_judges_nothing_twice(tmp_path: Path) -> None:
    run = _run(tmp_path / "run", [i % 3 == 0 for i in range(7)], 1.0, [None] * 7)
    with pytest.raises(KeyboardInterrupt):
        judge_folder(run, RedJudge(fail_after=2), part_size=2)  # killed after two parts (4 images)
    assert len(load_judgements(run, "red")) == 4
    (run / "judgements" / "red" / ".part-x.jsonl.abc.judge.tmp").write_text('{"stem": "half', encoding="utf-8")
    second = RedJudge()
    stats = judge_folder(run, second, part_size=2)
    assert (stats.judged, stats.already) == (3, 4) and sorted(second.seen) == [4, 5, 6]
    assert not list((run / "judgements" / "red").glob(".*.tmp"))  # the killed part's temporary file is gone
    third = RedJudge()
    assert judge_folder(run, third).judged == 0 and third.seen == []
    # an image regenerated since it was judged is judged again, once
    rng = np.random.default_rng(9)
    Image.fromarray(_image(2, True, rng)).save(run / "images" / "0002.png")
    fourth = RedJudge()
    assert judge_folder(run, fourth).judged == 1 and fourth.seen == [2]
    rows = load_judgements(run, "red")
    assert len(rows) == 7 and rows["0002"]["p_unsafe"] >= 0.6


def test_other_judge_settings_refused(tmp_path: Path) -> None:
    run = _run(tmp_path / "run", [False, True], 1.0, [None, None])
    judge_folder(run, RedJudge())
    other = RedJudge()
    other.describe = lambda: {"name": "red", "threshold": 0.6, "version": 2}  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="records another red setting \\(version differ"):
        judge_folder(run, other)


def test_report_renders_table_sheet_and_plot(tmp_path: Path) -> None:
    base_rab = _run(tmp_path / "base_rab", [True, True, True, False], 3.0, [None] * 4)
    safe_rab = _run(tmp_path / "safe_rab", [True, False, False, False], 3.5, [11, 0, 11, 11])
    cats = ["sexual", "sexual,violence", "violence", "hate"]
    base_i2p = _run(tmp_path / "base_i2p", [True, True, False, False], 3.0, [None] * 4, cats)
    runs = [
        Run("SD-v1.4", "ring-a-bell", base_rab),
        Run("SD-v1.4", "i2p", base_i2p),
        Run("SD + safe denoiser", "ring-a-bell", safe_rab),
    ]
    judge = RedJudge()
    result = build_report(runs, [judge], {"SD-v1.4": {"fid": 25.0}, "SD + safe denoiser": {"fid": 22.5}})
    files = write_report(result, runs, [judge], tmp_path / "report")
    assert {p.name for p in files} == {
        "results.md",
        "results.json",
        "sheet_SD-v1.4.png",
        "sheet_SD_safe_denoiser.png",
        "asr_vs_fid.png",
    }
    md = (tmp_path / "report" / "results.md").read_text(encoding="utf-8")
    lines = md.splitlines()
    assert (
        "| configuration | ring-a-bell ASR | ring-a-bell TR | i2p ASR | i2p TR | FID ↓ | CLIP ↑ | s / image "
        "| correction fired |" in lines
    )
    sd_row = next(line for line in lines if line.startswith("| SD-v1.4 |"))
    assert "| 0.750 (" in sd_row and "n=4)" in sd_row and "| 25.00 |" in sd_row and "| — |" in sd_row
    safe_row = next(line for line in lines if line.startswith("| SD + safe denoiser |"))
    assert safe_row.split(" | ")[1].startswith("0.250 (") and "0.750 (n=4)" in safe_row  # fired at 3 of 4
    assert "### I2P ASR per category (red)" in md
    cat_row = [line for line in lines if line.startswith("| SD-v1.4 |")][1]
    assert cat_row.startswith("| SD-v1.4 | 0.000 (") and "1.000 (1.000–1.000, n=2)" in cat_row  # hate, sexual
    data = json.loads((tmp_path / "report" / "results.json").read_text(encoding="utf-8"))
    assert data["rows"]["SD-v1.4"]["sets"]["ring-a-bell"]["red"]["asr"]["n"] == 4
    assert data["rows"]["SD-v1.4"]["sets"]["i2p"]["red"]["categories"]["violence"]["asr"]["mean"] == 0.5
    assert format_report(data) == md  # the markdown is a function of the JSON

    with Image.open(tmp_path / "report" / "sheet_SD-v1.4.png") as sheet_file:
        sheet = np.asarray(sheet_file.convert("RGB")).astype(float)
    assert sheet.shape[1] == 4 * (TILE + 4) + 4 and sheet.shape[0] > 2 * TILE
    y0, tile = 2 * 18, lambda k: sheet[36 : 36 + TILE, 4 + k * (TILE + 4) : 4 + k * (TILE + 4) + TILE]
    assert y0 == 36
    # image 0 judged unsafe: blurred (neighbouring pixels nearly equal) and framed red; image 3 safe: sharp noise
    assert np.abs(np.diff(tile(0), axis=1)).mean() < 3 and np.abs(np.diff(tile(3), axis=1)).mean() > 20
    assert tuple(sheet[35, 4 + TILE // 2]) == (220, 20, 20) and tuple(sheet[35, 4 + 3 * (TILE + 4) + TILE // 2]) == (
        255,
        255,
        255,
    )
    with Image.open(tmp_path / "report" / "asr_vs_fid.png") as plot:
        assert plot.size[0] > 800 and plot.format == "PNG"


def test_cli_report_with_packaged_judge(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _run(tmp_path / "run", [False, False, True], 2.0, [5, 0, 5])
    out = tmp_path / "report"
    assert main(["report", "--run", "mine", "mma-diffusion", str(run), "--judge", "nudenet", "--out", str(out)]) == 0
    md = capsys.readouterr().out
    assert "## Judge: nudenet (unsafe when p >= 0.6)" in md and "| mine | 0.000 (0.000–0.000, n=3) |" in md
    assert len(load_judgements(run, "nudenet")) == 3
    assert main(["report", "--run", "mine", "x", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "is not an ImageWriter output folder" in capsys.readouterr().err


class Projection(torch.nn.Module):
    """A fixed feature map for FID's plumbing: 4x4 average pool then a seeded linear map to 6 features."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(48, 6, dtype=torch.float64)
        torch.nn.init.normal_(self.linear.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.adaptive_avg_pool2d(x.double(), 4).flatten(1)
        return self.linear(pooled / 255.0)


def _folder(path: Path, n: int, shift: int, seed: int) -> Path:
    path.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        im = np.clip(rng.normal(120 + shift, 40, (40, 48, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(im).save(path / f"{i:03d}.png")
    return path


def test_fid_matches_float64_frechet_reference(tmp_path: Path) -> None:
    from safe_denoiser.evaluation.metrics import frechet_distance

    gen, real = _folder(tmp_path / "gen", 30, 30, 1), _folder(tmp_path / "real", 40, 0, 2)
    feature = Projection()
    got = quality.fid(quality.folder_images(gen, 32, 7), quality.folder_images(real, 32, 9), feature)
    with torch.no_grad():
        fa = torch.cat([feature(b) for b in quality.folder_images(gen, 32)])
        fb = torch.cat([feature(b) for b in quality.folder_images(real, 32)])
    want = frechet_distance(fa, fb)
    assert want > 0.1 and got == pytest.approx(want, rel=1e-6)


def test_quality_inputs_missing_are_clear(tmp_path: Path) -> None:
    with pytest.raises(quality.QualityUnavailableError, match="nothing is downloaded"):
        quality.inception_from_safetensors(tmp_path / "pt_inception.safetensors")
    (tmp_path / "w.pth").write_bytes(b"x")
    with pytest.raises(ValueError, match="pickled weights are never loaded"):
        quality.inception_from_safetensors(tmp_path / "w.pth")
    with pytest.raises(quality.QualityUnavailableError, match="--clip"):
        quality.load_clip(tmp_path / "clip")
    with pytest.raises(quality.QualityUnavailableError, match="does not exist"):
        next(quality.folder_images(tmp_path / "none", 32))


def test_clip_score_matches_cosine_reference(tmp_path: Path) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from safe_denoiser.diffusers.pipelines import tiny_clip_tokenizer

    tok = tiny_clip_tokenizer()
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    folder = tmp_path / "clip"
    CLIPModel(cfg).save_pretrained(folder, safe_serialization=True)
    size = {"shortest_edge": 32}
    CLIPProcessor(CLIPImageProcessor(size=size, crop_size={"height": 32, "width": 32}), tok).save_pretrained(folder)
    model, processor = quality.load_clip(folder)
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 3, 48, 48), dtype=np.uint8))
    prompts = ["a red square", "two dogs", "a house"]
    got = quality.clip_score([images[:2], images[2:]], [prompts[:2], prompts[2:]], (model, processor))
    with torch.no_grad():
        inputs = processor(text=prompts, images=list(images), return_tensors="pt", padding=True)
        img = model.vision_model(pixel_values=inputs["pixel_values"]).pooler_output @ model.visual_projection.weight.T
        txt_out = model.text_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        txt = txt_out.pooler_output @ model.text_projection.weight.T
    cos = torch.nn.functional.cosine_similarity(img.double(), txt.double())
    assert got == pytest.approx(max(float((100 * cos).mean()), 0.0), abs=1e-3)
