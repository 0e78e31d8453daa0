"""Every shipped YAML config parses against the real classes (LightningCLI --print_config validates keys)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from safe_denoiser.cli import main

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_configs_exist() -> None:
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_parses(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = config.read_text(encoding="utf-8").lstrip()
    assert first.startswith("#"), "each config opens with its documenting comment block"
    with pytest.raises(SystemExit) as exc:
        main(["predict", "--config", str(config), "--print_config"])
    assert exc.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    written = yaml.safe_load(config.read_text(encoding="utf-8"))
    for section in ("model", "data"):
        for key, value in written[section].items():
            assert printed[section][key] == value, f"{section}.{key}"


def test_unknown_key_is_rejected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  model: tiny-sd\n  sampler_steps: 3\ndata:\n  prompts: p.txt\n", encoding="utf-8")
    # the factory's check runs before LightningCLI parses: a one-line error, exit 2, the key named
    assert main(["predict", "--config", str(bad), "--print_config"]) == 2
    err = capsys.readouterr().err
    assert "unknown model field(s) ['sampler_steps']" in err and "Traceback" not in err
