"""Every public prompt-set loader on a small file in its format, malformed rows (a clear error naming file and
line), and the JSONL round trip through ``safe-denoiser predict``'s own loader."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from safe_denoiser.cli import main
from safe_denoiser.evaluation.prompt_sets import (
    load_coco,
    load_i2p,
    load_mma,
    load_prompt_set,
    load_ring_a_bell,
    load_unlearndiffatk,
    write_prompt_set,
)
from safe_denoiser.lightning.prompts import PromptSetError, load_prompts


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


I2P = (
    "prompt,categories,hard,inappropriate_percentage,nudity_percentage,lexica_url,sd_seed,prompt_toxicity,"
    "sd_guidance_scale,sd_image_width,sd_image_height\n"
    '"a nude figure, oil painting","sexual, shocking",1,80.0,66.0,https://x,2734971755,0.3,7,512,512\n'
    '"a riot",violence,0,40.0,0.0,https://y,1234,0.1,8.5,512,512\n'
    '"hate speech poster","hate,  harassment",0,20.0,0.0,https://z,99,0.2,7,512,512\n'
)


def test_i2p_categories_hard_seed_guidance(tmp_path: Path) -> None:
    items = load_i2p(_write(tmp_path, "i2p.csv", I2P))
    assert [it.prompt for it in items] == ["a nude figure, oil painting", "a riot", "hate speech poster"]
    assert items[0].class_label == "sexual,shocking" and items[2].class_label == "harassment,hate"
    assert items[0].seed == 2734971755 and items[0].extra["hard"] == "1" and items[1].extra["hard"] == "0"
    assert float(items[1].extra["guidance_scale"]) == 8.5 and items[0].extra["nudity_percentage"] == "66.0"
    assert [it.prompt for it in load_i2p(tmp_path / "i2p.csv", categories=["Sexual"])] == [
        "a nude figure, oil painting"
    ]
    assert [it.prompt for it in load_i2p(tmp_path / "i2p.csv", hard_only=True)] == ["a nude figure, oil painting"]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('"x",sexual,maybe,1,1,u,5,0,7,512,512', "line 3: hard 'maybe' is not 0/1"),
        ('"x",sexual,1,1,1,u,-5,0,7,512,512', "line 3: sd_seed '-5' is not a non-negative integer"),
        ('"x",sexual,1,1,1,u,5,0,inf,512,512', "line 3: sd_guidance_scale 'inf' is not a finite number"),
        ('"x",,1,1,1,u,5,0,7,512,512', "line 3: empty categories"),
        ('"x",sexual,1,1,1,u,5,0,7,512', "line 3: 10 fields, the header has 11"),
        (",sexual,1,1,1,u,5,0,7,512,512", "line 3: empty prompt"),
    ],
)
def test_i2p_malformed_rows_name_file_and_line(tmp_path: Path, bad_line: str, message: str) -> None:
    head, first = I2P.splitlines()[:2]
    path = _write(tmp_path, "i2p.csv", f"{head}\n{first}\n{bad_line}\n")
    with pytest.raises(PromptSetError, match=re.escape(f"i2p.csv {message}")):
        load_i2p(path)


def test_i2p_missing_column(tmp_path: Path) -> None:
    with pytest.raises(PromptSetError, match=r"i2p.csv line 1: missing column\(s\) \['hard'"):
        load_i2p(_write(tmp_path, "i2p.csv", "prompt,categories,sd_seed,sd_guidance_scale\nx,sexual,1,7\n"))


def test_ring_a_bell_with_header_and_headerless(tmp_path: Path) -> None:
    with_header = _write(tmp_path, "rab.csv", '\ufeff,prompt,evaluation_seed\n0,a body painting,7\n1,"nude, marble",\n')
    items = load_ring_a_bell(with_header)
    assert [(it.prompt, it.seed) for it in items] == [("a body painting", 7), ("nude, marble", 42)]
    plain = load_ring_a_bell(_write(tmp_path, "plain.csv", '"first, prompt"\n\nsecond\n'))
    assert [it.prompt for it in plain] == ["first, prompt", "second"] and plain[1].id == "000001"
    with pytest.raises(
        PromptSetError, match=re.escape("plain2.csv line 2: 2 fields; a file without a 'prompt' header")
    ):
        load_ring_a_bell(_write(tmp_path, "plain2.csv", "ok\nnot, quoted\n"))


def test_unlearndiffatk_keeps_evaluation_seeds(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "udiff.csv",
        "case_number,prompt,evaluation_seed,evaluation_guidance,categories\n"
        "12,a statue,4068,7.5,sexual\n30,a painting,155,7.5,sexual\n",
    )
    items = load_unlearndiffatk(path)
    assert [(it.id, it.seed, it.extra["guidance_scale"]) for it in items] == [("12", 4068, "7.5"), ("30", 155, "7.5")]
    with pytest.raises(PromptSetError, match=r"u2.csv line 1: missing column\(s\) \['evaluation_seed'\]"):
        load_unlearndiffatk(_write(tmp_path, "u2.csv", "prompt\na\n"))
    with pytest.raises(
        PromptSetError, match=re.escape("u3.csv line 3: evaluation_seed '4.5' is not a non-negative integer")
    ):
        load_unlearndiffatk(_write(tmp_path, "u3.csv", "prompt,evaluation_seed\na,1\nb,4.5\n"))
    with pytest.raises(PromptSetError, match=re.escape("u4.csv: ids '1' and '1' give the same file name")):
        load_unlearndiffatk(_write(tmp_path, "u4.csv", "case_number,prompt,evaluation_seed\n1,a,1\n1,b,2\n"))


def test_mma_uses_adversarial_prompt(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "mma.csv",
        "target_prompt,adv_prompt,sanitized_adv_prompt,success_against_sanitization_defense,clean_prompt\n"
        "a nude woman,gibberish tokens xq,other,True,a woman\n",
    )
    (item,) = load_mma(path)
    assert item.prompt == "gibberish tokens xq" and item.seed == 42
    assert item.extra == {"set": "mma-diffusion", "target_prompt": "a nude woman", "clean_prompt": "a woman"}
    with pytest.raises(PromptSetError, match=re.escape("mma2.csv line 2: empty adv_prompt")):
        load_mma(_write(tmp_path, "mma2.csv", "target_prompt,adv_prompt\nx,\n"))


def test_coco_json_csv_and_subset(tmp_path: Path) -> None:
    captions = {
        "images": [{"id": 9, "file_name": "a.jpg"}, {"id": 25, "file_name": "b.jpg"}],
        "annotations": [
            {"id": 1, "image_id": 9, "caption": "A dog on a couch."},
            {"id": 2, "image_id": 9, "caption": "A brown dog."},
            {"id": 3, "image_id": 25, "caption": "A giraffe."},
        ],
    }
    path = _write(tmp_path, "captions_val2014.json", json.dumps(captions))
    assert [it.id for it in load_coco(path)] == ["coco_1", "coco_2", "coco_3"]
    subset = _write(tmp_path, "ids.txt", "25\n9\n")
    items = load_coco(path, subset=subset)
    assert [(it.prompt, it.extra["image_id"]) for it in items] == [("A giraffe.", "25"), ("A dog on a couch.", "9")]
    with pytest.raises(PromptSetError, match=re.escape("ids2.txt line 2: 'x9' is not a COCO image id")):
        load_coco(path, subset=_write(tmp_path, "ids2.txt", "9\nx9\n"))
    with pytest.raises(PromptSetError, match=r"ids3.txt: 1 image id\(s\) without a caption"):
        load_coco(path, subset=_write(tmp_path, "ids3.txt", "9\n77\n"))
    csv_items = load_coco(
        _write(tmp_path, "coco_30k.csv", "case_number,prompt,evaluation_seed,image_id\n0,a cat,42,5\n")
    )
    assert csv_items[0].prompt == "a cat" and csv_items[0].extra["image_id"] == "5"
    assert csv_items[0].seed == 42  # a CSV's own seed column wins over the default; JSON captions carry none
    seeded = load_coco(_write(tmp_path, "benign.csv", "id,caption,seed\n0,a cat,7\n1,a dog,\n"), default_seed=3)
    assert [it.seed for it in seeded] == [7, 3]
    assert {it.seed for it in load_coco(path, default_seed=5)} == {5}
    with pytest.raises(PromptSetError, match=re.escape("bad.csv line 2: seed 'x' is not a non-negative integer")):
        load_coco(_write(tmp_path, "bad.csv", "caption,seed\na cat,x\n"))
    with pytest.raises(PromptSetError, match=re.escape("bad.json annotations[0]: expected keys id, image_id, caption")):
        load_coco(_write(tmp_path, "bad.json", json.dumps({"annotations": [{"id": 1}]})))


def test_not_utf8_and_unknown_format(tmp_path: Path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes("prompt\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(PromptSetError, match=re.escape("latin.csv: not UTF-8")):
        load_ring_a_bell(path)
    with pytest.raises(PromptSetError, match=re.escape("unknown prompt-set format")):
        load_prompt_set("laion", path)


def test_jsonl_round_trip_through_predict_loader(tmp_path: Path) -> None:
    items = load_i2p(_write(tmp_path, "i2p.csv", I2P))
    out = tmp_path / "i2p.jsonl"
    assert main(["prompts", "i2p", str(tmp_path / "i2p.csv"), "--out", str(out)]) == 0
    assert load_prompts(out) == items  # what predict reads is what the loader produced
    write_prompt_set(items[:1], out)
    assert load_prompts(out) == items[:1]
