"""Prompt sets (txt/csv/jsonl, public attack-set columns), file-name sanitising, and the writer's files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from safe_denoiser.lightning.prompts import PromptItem, PromptSetError, load_prompts, safe_file_stem
from safe_denoiser.lightning.writer import GeneratedImage, ImageWriter, finished_stems, image_path, read_metadata


def test_txt(tmp_path: Path) -> None:
    p = tmp_path / "p.txt"
    p.write_text("a cat\n\n  a dog  \n", encoding="utf-8")
    items = load_prompts(p)
    assert [(i.id, i.prompt, i.seed) for i in items] == [("000000", "a cat", 42), ("000001", "a dog", 42)]


def test_csv_with_attack_set_columns(tmp_path: Path) -> None:
    p = tmp_path / "unlearndiff.csv"
    p.write_text(
        "case_number,prompt,evaluation_seed,categories,nudity_percentage\n"
        '17,"a painting, nude",2922,sexual,85.0\n'
        "18,another,1,violence,0\n",
        encoding="utf-8",
    )
    items = load_prompts(p)
    assert items[0] == PromptItem(
        id="17", prompt="a painting, nude", seed=2922, class_label="sexual", extra={"nudity_percentage": "85.0"}
    )
    assert items[1].seed == 1
    q = tmp_path / "i2p.csv"
    q.write_text("prompt,sd_seed,negative_prompt\nx,7,blurry\n", encoding="utf-8")
    (item,) = load_prompts(q)
    assert (item.seed, item.negative_prompt, item.id) == (7, "blurry", "000000")


def test_jsonl(tmp_path: Path) -> None:
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "x", "seed": 3, "id": "a/b"}\n\n{"text": "y", "class": 4}\n', encoding="utf-8")
    a, b = load_prompts(p, default_seed=9)
    assert (a.seed, a.stem, b.prompt, b.seed, b.class_label) == (3, "a_b", "y", 9, "4")


@pytest.mark.parametrize(
    ("name", "body", "message"),
    [
        ("p.csv", "text_only,seed\nx,1\n", "no prompt column"),
        ("p.csv", "prompt,seed\nx,abc\n", "p.csv line 2: seed 'abc' is not an integer"),
        ("p.jsonl", '{"prompt": "x"}\nnot json\n', "line 2: not valid JSON"),
        ("p.jsonl", '["prompt"]\n', "expected a JSON object"),
        ("p.jsonl", '{"caption2": "x"}\n', "no prompt: expected a column named one of"),
        ("p.yaml", "prompt: x\n", "unsupported suffix"),
        ("p.txt", "\n\n", "holds no prompts"),
        ("p.csv", "id,prompt\na b,x\na_b,y\n", "same file name"),
        ("p.csv", "prompt,seed\nx,-1\n", "must be in"),
    ],
)
def test_bad_prompt_files(tmp_path: Path, name: str, body: str, message: str) -> None:
    p = tmp_path / name
    p.write_text(body, encoding="utf-8")
    with pytest.raises(PromptSetError, match=message):
        load_prompts(p)


def test_missing_and_binary_files(tmp_path: Path) -> None:
    with pytest.raises(PromptSetError, match="does not exist"):
        load_prompts(tmp_path / "nope.csv")
    p = tmp_path / "bin.txt"
    p.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(PromptSetError, match="not UTF-8"):
        load_prompts(p)


@pytest.mark.parametrize(
    ("raw", "stem"),
    [("../../etc/passwd", "_.._etc_passwd"), ("a b/c", "a_b_c"), ("ok-1.2_x", "ok-1.2_x"), ("..", None), ("", None)],
)
def test_safe_file_stem(raw: str, stem: str | None) -> None:
    if stem is None:
        with pytest.raises(PromptSetError, match="empty file name"):
            safe_file_stem(raw)
    else:
        assert safe_file_stem(raw) == stem
        assert "/" not in stem and not stem.startswith(".")


class _FakeTrainer:
    global_rank = 1
    datamodule = None


def test_writer_files_and_resume_state(tmp_path: Path) -> None:
    writer = ImageWriter(str(tmp_path / "out"))
    writer.setup(_FakeTrainer(), None, "predict")  # type: ignore[arg-type]
    items = [PromptItem(id=f"i{k}", prompt=f"p{k}", seed=k) for k in range(3)]
    pixels = [np.full((4, 5, 3), 10 * k, dtype=np.uint8) for k in range(3)]
    writer.write_images(
        [GeneratedImage(it, px, {"applied_steps": 2}) for it, px in zip(items[:2], pixels[:2], strict=True)]
    )
    assert finished_stems(tmp_path / "out", items) == {"i0", "i1"}
    with Image.open(image_path(tmp_path / "out", items[1])) as im:
        assert np.array_equal(np.asarray(im), pixels[1])
        record = json.loads(im.text["safe-denoiser"])  # the image carries its own record
        assert {k: record[k] for k in ("id", "seed", "prompt", "applied_steps")} == {
            "id": "i1",
            "seed": 1,
            "prompt": "p1",
            "applied_steps": 2,
        }
    rows = read_metadata(tmp_path / "out")
    assert set(rows) == {"i0", "i1"} and rows["i0"]["applied_steps"] == 2 and rows["i0"]["file"] == "images/i0.png"
    # a corrupt image (e.g. written by something else and cut short) is not taken for a finished one
    path = image_path(tmp_path / "out", items[0])
    path.write_bytes(path.read_bytes()[:30])
    assert finished_stems(tmp_path / "out", items) == {"i1"}
    # a killed append leaves a partial row: the next setup drops it, keeping the rows of whole images (the corrupt
    # image's row goes with it: that item is to be generated again)
    writer.teardown(_FakeTrainer(), None, "predict")  # type: ignore[arg-type]  # releases the folder's lock
    meta = tmp_path / "out" / "metadata" / "rank1.jsonl"
    meta.write_text(meta.read_text() + '{"id": "i2", "prom', encoding="utf-8")
    (tmp_path / "out" / "images" / ".i2.png.abc.rank1.tmp").write_bytes(b"partial")
    ImageWriter(str(tmp_path / "out")).setup(_FakeTrainer(), None, "predict")  # type: ignore[arg-type]
    assert set(read_metadata(tmp_path / "out")) == {"i1"}
    assert not list((tmp_path / "out" / "images").glob(".*.tmp"))


def test_writer_rejects_a_file_as_output_dir(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        ImageWriter(str(f)).setup(_FakeTrainer(), None, "predict")  # type: ignore[arg-type]
    assert f.read_text() == "x"
