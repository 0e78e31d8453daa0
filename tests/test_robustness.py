"""Bad input and hostile conditions: each fails early with a message naming the problem, or is handled.

One test per item of the robustness review: a second run into a busy folder (a real second process), a killed
holder's stale lock, NaN settings and overflowing banks, unwritable folders, late failures, silent coercions,
byte-order marks, non-UTF-8 files, empty cells and huge ids.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from safe_denoiser.lightning.data import PromptDataModule
from safe_denoiser.lightning.lock import FolderInUseError
from safe_denoiser.lightning.outputs import OutputFolder, OutputFolderError
from safe_denoiser.lightning.prompts import PromptItem, PromptSetError, load_prompts
from safe_denoiser.lightning.writer import GeneratedImage, ImageWriter

HOLDER = """
import sys, time
from pathlib import Path
from safe_denoiser.lightning.outputs import OutputFolder
folder = OutputFolder(sys.argv[1]).lock()
(Path(sys.argv[1]) / "images" / f".a.png.x1.{folder.temp_tag}.tmp").write_bytes(b"half an image")
print("locked", flush=True)
time.sleep(300)
"""


def predict(out: Path, prompts: Path, *extra: str) -> int:
    """``safe-denoiser predict`` in this process (the demo model, 2 steps): its exit code."""
    from safe_denoiser.cli import main

    args = ["predict", "--model.model=demo", "--model.num_inference_steps=2", f"--data.prompts={prompts}"]
    return main([*args, f"--data.output_dir={out}", "--trainer.accelerator=cpu", "--trainer.logger=false", *extra])


@pytest.fixture
def labels(tmp_path: Path) -> Path:
    p = tmp_path / "labels.csv"
    p.write_text("id,prompt\na,1\nb,2\nc,3\n", encoding="utf-8")
    return p


# ---- one writer per folder ---------------------------------------------------------------------------------------
def test_a_second_process_is_refused_naming_the_holder_and_a_dead_ones_lock_does_not_block(
    tmp_path: Path, labels: Path
) -> None:
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        items = load_prompts(labels)
        with pytest.raises(FolderInUseError, match=rf"in use by another run \(.lock-rank0 held by pid {holder.pid} "):
            OutputFolder(out).prepare(items)
        (temp,) = (out / "images").glob(".*.tmp")  # the live holder's temporary file is not touched
    finally:
        holder.kill()  # SIGKILL: no clean-up; the kernel drops its lock
        holder.wait()
    folder = OutputFolder(out)
    assert folder.prepare(items).finished == set()  # the stale lock does not block
    assert not temp.exists()  # and its dead owner's temporary file is gone
    folder.close()


def test_predict_into_a_busy_folder_fails_cleanly(
    tmp_path: Path, labels: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert predict(out, labels) == 2
    finally:
        holder.kill()
        holder.wait()
    err = capfd.readouterr().err
    assert f"is in use by another run (.lock-rank0 held by pid {holder.pid} on host" in err, err[-2000:]
    assert "Loading pipeline" not in err  # refused before the model was built
    assert not list(out.rglob("*.png"))


# ---- nothing non-finite is written -------------------------------------------------------------------------------
def test_nan_guidance_and_non_integers_are_refused_up_front() -> None:
    from safe_denoiser.lightning.module import SafeDiffusionModule

    with pytest.raises(ValueError, match=r"model\.guidance_scale must be a finite number, got nan"):
        SafeDiffusionModule(model="demo", guidance_scale=float("nan"))
    with pytest.raises(ValueError, match=r"model\.num_inference_steps must be a positive int, got 2\.5"):
        SafeDiffusionModule(model="demo", num_inference_steps=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"model\.height must be an int >= 1 or null, got 32\.5"):
        SafeDiffusionModule(model="tiny-sd", height=32.5)  # type: ignore[arg-type]


def test_non_finite_samples_are_an_error_naming_the_item_and_step() -> None:
    from safe_denoiser import NegativeBank
    from safe_denoiser.lightning.checks import NonFiniteOutputError
    from safe_denoiser.lightning.module import SafeDiffusionModule

    with pytest.raises(ValueError, match="bank"):  # a bank of huge values is refused where it is made
        NegativeBank.from_tensor(torch.full((4, 1, 8, 8), 1e30))
    module = SafeDiffusionModule(
        model="demo", num_inference_steps=3, bank="bundled", safe_denoiser={"preset": "constant", "beta": 1.0}
    )
    module.configure_model()
    module.on_predict_start()
    (image,) = module.predict_step([PromptItem("x7", "3", 1)])  # the check does not fire on good images
    assert image.image.dtype == np.uint8
    calls = {"n": 0}

    def nan_at_step_two(unet: Any, args: Any, out: Any) -> Any:  # a denoiser that overflows at its second call
        calls["n"] += 1
        return type(out)(sample=out.sample * float("nan")) if calls["n"] == 2 else out

    handle = module.pipe.unet.register_forward_hook(nan_at_step_two)
    try:
        with pytest.raises(
            NonFiniteOutputError,
            match=r"item\(s\) 'x7' \(seed 1\): .* NaN or Inf, first at denoising step 2 of 3 \(the denoiser's output\)",
        ):
            module.predict_step([PromptItem("x7", "3", 1)])
    finally:
        handle.remove()


def test_a_window_outside_the_schedule_is_refused() -> None:
    from diffusers import DDIMScheduler

    from safe_denoiser.lightning.checks import check_window

    sched = DDIMScheduler(num_train_timesteps=1000)
    with pytest.raises(ValueError, match=r"window must contain at least one sampled timestep, got \[2000, 3000\]"):
        check_window((2000.0, 3000.0), sched, 10)
    check_window((0.0, 1000.0), sched, 10)
    with pytest.raises(ValueError, match="the 3 steps sample timesteps"):
        check_window((780.0, 1000.0), sched, 3)  # 3 DDIM steps: 666, 333, 0; none in the reference window


def test_a_nan_in_a_record_is_refused_before_its_image(tmp_path: Path) -> None:
    class Trainer:
        global_rank = 0
        datamodule = None

    writer = ImageWriter(str(tmp_path / "out"))
    writer.setup(Trainer(), None, "predict")  # type: ignore[arg-type]
    item = PromptItem("n1", "x", 1)
    with pytest.raises(ValueError, match="item 'n1': its metadata row holds a NaN"):
        writer.write_images([GeneratedImage(item, np.zeros((4, 4), np.uint8), {"score": float("nan")})])
    writer.teardown(Trainer(), None, "predict")  # type: ignore[arg-type]
    assert not list((tmp_path / "out" / "images").glob("*.png"))


# ---- folders: checked before any model loads, nothing left by a failed start -----------------------------------
def _deny(monkeypatch: pytest.MonkeyPatch, denied: Path) -> None:
    """os.access says ``denied`` is not writable (the tests run as root, which chmod cannot stop)."""
    real = os.access

    def access(path: Any, mode: int, **kw: Any) -> bool:
        return False if Path(path) == denied and mode & os.W_OK else real(path, mode, **kw)

    monkeypatch.setattr(os, "access", access)


def test_unwritable_images_folder_fails_before_generating(
    tmp_path: Path, labels: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    _deny(monkeypatch, out / "images")
    dm = PromptDataModule(str(labels), str(out))
    with pytest.raises(OutputFolderError, match=r"the folder '.*/out/images' is not writable by this user"):
        dm.remaining_items()
    assert sorted(p.name for p in out.iterdir()) == ["images"]  # no metadata/, no lock file


def test_unwritable_parent_creates_nothing(tmp_path: Path, labels: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _deny(monkeypatch, tmp_path)
    with pytest.raises(OutputFolderError, match="is not writable"):
        PromptDataModule(str(labels), str(tmp_path / "new" / "out")).remaining_items()
    assert not (tmp_path / "new").exists()


def test_a_bad_item_fails_before_the_model_loads_and_leaves_no_folder(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    prompts = tmp_path / "p.csv"
    prompts.write_text("id,prompt\na,1\nb,2\nc,13\n", encoding="utf-8")  # the third item's label is out of range
    assert predict(tmp_path / "out", prompts) == 2
    err = capfd.readouterr().err
    labels = "0-12 (10: no class, 11: a digit with a loop, 12: any digit)"
    assert f"item 'c': class label must be one of {labels}, got 13" in err, err[-2000:]
    assert "Loading pipeline" not in err  # failed before the model was built
    assert not (tmp_path / "out").exists()


def test_a_failed_start_after_the_lock_removes_what_it_created(
    tmp_path: Path, labels: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A failure after the folder was made (here a bank of the wrong sample shape, found when it is attached to the
    built model) leaves no empty folders behind."""
    from safe_denoiser import NegativeBank

    bank = NegativeBank.from_tensor(torch.randn(3, 1, 4, 4)).save(tmp_path / "small.safetensors")
    guidance = "--model.safe_denoiser={preset: constant, beta: 1}"
    assert predict(tmp_path / "out", labels, f"--model.bank={bank}", guidance) == 2
    err = capfd.readouterr().err
    assert "(1, 8, 8)" in err and "(1, 4, 4)" in err, err[-2000:]
    assert "Loading pipeline" in err  # it failed after the folder was made and the model loaded
    assert not (tmp_path / "out").exists()


def test_a_missing_bank_fails_before_the_model_loads(
    tmp_path: Path, labels: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """The banks are hashed into the run's settings before the folder is touched: a missing one fails first."""
    missing = tmp_path / "missing.safetensors"
    guidance = "--model.safe_denoiser={preset: constant, beta: 1}"
    assert predict(tmp_path / "out", labels, f"--model.bank={missing}", guidance) == 2
    err = capfd.readouterr().err
    assert "bank file" in err and "missing.safetensors' does not exist" in err, err[-2000:]
    assert "Loading pipeline" not in err
    assert not (tmp_path / "out").exists()


# ---- prompt files: no silent coercion, clear messages --------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "body", "message"),
    [
        ("p.csv", "prompt,seed\nx,1.9\n", "p.csv line 2: seed '1.9' is not an integer"),
        ("p.jsonl", '{"prompt": "x", "seed": 1.5}\n', "line 1: seed 1.5 is not an integer"),
        ("p.jsonl", '{"prompt": "x", "seed": true}\n', "line 1: seed True is not an integer"),
        ("p.csv", "id,prompt\na,x\nb,\n", r"p.csv line 3: the prompt is empty \(column 'prompt'\)"),
        ("p.jsonl", '{"prompt": "x"}\n{"prompt": ""}\n', r"line 2: the prompt is empty"),
    ],
)
def test_no_silent_coercion(tmp_path: Path, name: str, body: str, message: str) -> None:
    p = tmp_path / name
    p.write_text(body, encoding="utf-8")
    with pytest.raises(PromptSetError, match=message):
        load_prompts(p)


def test_integral_seeds_written_as_floats_are_accepted(tmp_path: Path) -> None:
    p = tmp_path / "p.csv"
    p.write_text("prompt,seed\nx,2922.0\ny, 7 \n", encoding="utf-8")
    assert [it.seed for it in load_prompts(p)] == [2922, 7]


@pytest.mark.parametrize(
    ("name", "body"), [("p.csv", "id,prompt\nk1,x\n"), ("p.jsonl", '{"id": "k1", "prompt": "x"}\n')]
)
def test_a_byte_order_mark_is_dropped(tmp_path: Path, name: str, body: str) -> None:
    p = tmp_path / name
    p.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    (item,) = load_prompts(p)
    assert (item.id, item.prompt) == ("k1", "x")


def test_a_non_utf8_file_names_the_line(tmp_path: Path) -> None:
    p = tmp_path / "p.csv"
    p.write_bytes("id,prompt\na,fine\nb,caf\xe9\n".encode("latin-1"))
    with pytest.raises(PromptSetError, match=r"'p.csv' is not UTF-8 text: line 3 has the byte 0xe9"):
        load_prompts(p)


def test_huge_ids_are_clipped_in_messages(tmp_path: Path) -> None:
    from safe_denoiser.lightning.module import SafeDiffusionModule

    huge = "x" * 5000
    p = tmp_path / "p.csv"
    p.write_text(f"id,prompt\n{huge},1\n{huge}!,2\n", encoding="utf-8")
    with pytest.raises(PromptSetError) as info:
        load_prompts(p)
    assert "give the same file name" in str(info.value) and len(str(info.value)) < 500
    with pytest.raises(ValueError) as info2:
        SafeDiffusionModule(model="demo").check_items([PromptItem(huge, "13", 1)])
    assert "(5002 characters)" in str(info2.value) and len(str(info2.value)) < 300


# ---- the model section: one parser for predict and export ---------------------------------------------------------
@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"guidance_scale": float("nan")}, r"model\.guidance_scale must be a finite number, got nan"),
        ({"guidance_scale": "7.5"}, r"model\.guidance_scale must be a finite number, got '7\.5'"),
        ({"num_inference_steps": 2.5}, r"model\.num_inference_steps must be a positive int, got 2\.5"),
        ({"seed": 1.9}, r"model\.seed must be an int >= 0, got 1\.9"),
        ({"scheduler": 5}, r"model\.scheduler must be a string, got 5"),
        ({"bank": 5, "safe_denoiser": {}}, r"model\.bank must be a string or null, got 5"),
        ({"batch_invariant": "yes"}, r"model\.batch_invariant must be true or false"),
        ({"safe_denoiser": [1]}, r"model\.safe_denoiser must be a mapping or null"),
        ({"guidance_scle": 3}, r"unknown model field\(s\) \['guidance_scle'\]"),
    ],
)
def test_model_sections_are_checked_alike_for_predict_and_export(section: dict[str, Any], message: str) -> None:
    from safe_denoiser.models import ModelConfig

    with pytest.raises(ValueError, match=message):
        ModelConfig.from_mapping(section)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"height": 32}, r"model\.height must be null for model 'demo' \(it makes images of one fixed size\), got 32"),
        ({"width": 8}, r"model\.width must be null for model 'demo'"),
        ({"model": "no-such-model"}, r"model\.model must be one of .*demo.*, got 'no-such-model'"),
        ({"bank": "bundled", "safe_denoiser": {"preset": "constant", "window": 3}}, r"model\.safe_denoiser: .*window"),
        ({"bank": "bundled", "safe_denoiser": {"preset": "odds"}}, r"model\.reference_bank is required"),
        ({"sld": "medium"}, r"model\.sld needs a text model; model 'demo' takes class labels"),
    ],
)
def test_model_section_rules_of_the_kind(section: dict[str, Any], message: str) -> None:
    from safe_denoiser.models import ModelConfig

    with pytest.raises(ValueError, match=message):
        ModelConfig.from_mapping({"model": "demo", **section})


def test_a_bundled_bank_needs_a_kind_that_ships_one() -> None:
    from safe_denoiser.models import ModelConfig

    with pytest.raises(ValueError, match=r"model\.bank must be a \.safetensors bank file \(model 'tiny-sd' ships"):
        ModelConfig(model="tiny-sd", bank="bundled", safe_denoiser={"preset": "constant"})


# ---- bad input through `safe-denoiser predict`: one line naming the field, no traceback --------------------------
def _config(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(body, encoding="utf-8")
    return p


@pytest.mark.parametrize(
    ("body", "extra", "message"),
    [
        ("model:\n  model: demo\n  guidance_scale: [1\n", (), r"--config '.*run\.yaml' is not valid YAML at line 4"),
        (
            "model:\n  model: demo\n  bank: bundled\n  safe_denoiser: {preset: constant, window: 300}\n",
            (),
            r"model\.safe_denoiser: ConstantGuidance\.window must be a pair \[t_min, t_max\].*got 300",
        ),
        ("model:\n  model: demo\n  height: 16\n", (), r"model\.height must be null for model 'demo'"),
        ("model:\n  model: demo\n", ("--model.width=16",), r"model\.width must be null for model 'demo'"),
        ("model:\n  model: demo\n", ("--trainer.devices=0",), r"trainer\.devices must be a positive int"),
        ("model:\n  model: demo\n", ("--model.num_inference_steps=abc",), r'Parser key "model\.num_inference_steps"'),
    ],
)
def test_bad_predict_input_is_one_line_naming_the_field(
    tmp_path: Path, labels: Path, capfd: pytest.CaptureFixture[str], body: str, extra: tuple[str, ...], message: str
) -> None:
    config = _config(tmp_path, body)
    assert predict(tmp_path / "out", labels, "--config", str(config), *extra) == 2
    err = capfd.readouterr().err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("safe-denoiser predict: error:")]
    assert re.search(message, line), err[-2000:]
    assert "Traceback" not in err and "Loading pipeline" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the accelerator is valid here")
def test_a_gpu_accelerator_on_a_cpu_only_machine_names_the_field(
    tmp_path: Path, labels: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    assert predict(tmp_path / "out", labels, "--trainer.accelerator=gpu") == 2
    err = capfd.readouterr().err
    assert "trainer.accelerator must be 'cpu' or 'auto' on this machine (it has no usable CUDA GPU), got 'gpu'" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_the_demo_takes_its_super_class_labels_and_resume_compares_the_precision(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Labels 11 and 12 (the super-classes the model, evaluate and the bundles take) are predict prompts too; one
    folder never holds images of two precisions."""
    from safe_denoiser.lightning.writer import read_metadata

    prompts = tmp_path / "p.csv"
    prompts.write_text("id,prompt,negative_prompt\na,11,\nb,12,10\n", encoding="utf-8")
    out = tmp_path / "out"
    assert predict(out, prompts) == 0
    rows = read_metadata(out)
    assert sorted(rows) == ["a", "b"] and rows["a"]["settings"]["trainer.precision"] == "32-true"
    capfd.readouterr()
    assert predict(out, prompts, "--trainer.precision=bf16-mixed") == 2
    err = capfd.readouterr().err
    assert "setting 'trainer.precision': '32-true' in the folder, 'bf16-mixed' in this run" in err, err[-2000:]


@pytest.mark.parametrize("model", ["demo", "tiny-sd", "sd14-random"])
@pytest.mark.parametrize("field", ["model_dir", "unet_weights"])
def test_kinds_without_a_folder_refuse_model_dir_and_unet_weights(model: str, field: str, tmp_path: Path) -> None:
    """model_dir and unet_weights are read only by the folder kinds; any other kind used to ignore them silently."""
    import safe_denoiser.testing  # noqa: F401  (registers the tiny-* kinds)
    from safe_denoiser.errors import FieldError
    from safe_denoiser.models.config import ModelConfig

    with pytest.raises(FieldError, match=rf"model\.{field} must be null for model '{model}'") as exc:
        ModelConfig(model=model, **{field: str(tmp_path / "weights")})
    assert exc.value.field == field
    assert ModelConfig(model=model).model_dir is None  # without them the kind is accepted
