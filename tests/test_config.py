import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.compress.plan import output_fingerprint_payload
from pipeline.config import (
    CompressConfig,
    ConfigError,
    TrainSelectorConfig,
    load_config,
    preset_names,
    stable_hash,
)

REPO = Path(__file__).resolve().parent.parent
BASELINE = ["selector.method=random"]


def fingerprint(overrides: list[str]) -> str:
    cfg = load_config(CompressConfig, None, BASELINE + overrides)
    return stable_hash(output_fingerprint_payload(cfg, "enc-fp", "sel-fp"))


def test_overrides_merge_over_yaml_and_presets(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("encoder: clip-vit-l-336\nselector:\n  method: norm\n  ratio: 0.25\n")
    cfg = load_config(CompressConfig, str(config), ["selector.ratio=0.75", "encoder.batch_size=4"])
    assert cfg.encoder.name == "clip-vit-l-336" and cfg.encoder.image_size == 336
    assert cfg.encoder.batch_size == 4
    assert cfg.selector.method == "norm" and cfg.selector.ratio == 0.75


def test_preset_from_dotlist_then_field_override():
    cfg = load_config(CompressConfig, None, BASELINE + ["encoder=siglip-so400m", "encoder.pretrained=null"])
    assert cfg.encoder.family == "siglip" and cfg.encoder.pretrained is None
    assert {"tiny", "vit-b-16", "clip-vit-l-336", "siglip-so400m"} <= set(preset_names("encoder"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["encoder.nope=1"], "encoder.nope: unknown key; allowed keys:"),
        (["bogus=1"], "bogus: unknown key"),
        (["selector.mode=sometimes"], "selector.mode: got 'sometimes', expected one of 'threshold', 'ratio', 'budget'"),
        (["encoder.batch_size=many"], "encoder.batch_size: got 'many', expected an integer"),
        (["dry_run=3"], "dry_run: got 3, expected true or false"),
        (["encoder=nonexistent"], "encoder: unknown preset 'nonexistent'; allowed: clip-vit-l-336"),
        (["selector.ratio=1.5"], "selector.ratio: must be in (0, 1]"),
        (["encoder.image_size=8"], "encoder.image_size: must be at least patch_size"),
        (["ray.num_actors_min=4"], "ray.num_actors_min: need 1 <= num_actors_min <= num_actors_max"),
        (["selector.method=learned"], "selector.checkpoint: method=learned needs selector.checkpoint=PATH"),
        (["noequals"], "noequals: overrides are key=value"),
    ],
)
def test_config_errors_name_the_key_and_what_is_allowed(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(CompressConfig, None, BASELINE + overrides)
    assert message in str(info.value)


@pytest.mark.parametrize("argv", [["encoder.nope=1"], ["selector.mode=x"], ["--config", "missing.yaml"]])
def test_job_exits_2_with_one_line_and_no_traceback(argv):
    result = subprocess.run([sys.executable, "-m", "jobs.compress", *argv], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("config error: ")
    assert "Traceback" not in result.stderr


def test_cfg_hash_is_stable_and_tracks_output_changing_keys():
    base = fingerprint([])
    assert base == fingerprint([]) == fingerprint(["encoder.batch_size=3", "ray.num_actors_max=4",
                                                     "executor=local", "progress_interval_s=1"])
    changed = [
        ["encoder.select_layer=-1"], ["encoder.image_size=448"], ["encoder.anyres=true"],
        ["selector.method=norm"], ["selector.mode=ratio"], ["selector.threshold=0.3"], ["selector.min_tokens=4"],
        ["output.dtype=float32"], ["output.format=webdataset"], ["decode.max_pixels=1000"],
    ]
    hashes = {fingerprint(c) for c in changed}
    assert base not in hashes and len(hashes) == len(changed)
    cfg = load_config(CompressConfig, None, BASELINE)
    assert stable_hash(output_fingerprint_payload(cfg, "other-weights", "sel-fp")) != base


def test_unchanged_mode_params_do_not_change_the_hash():
    # ratio is irrelevant in threshold mode, so changing it must not move the output to a new prefix
    assert fingerprint(["selector.ratio=0.2"]) == fingerprint([])


def test_train_selector_config_loads():
    cfg = load_config(TrainSelectorConfig, None, ["train.steps=5", "train.selector_warmup_steps=2", "model.width=64"])
    assert cfg.train.steps == 5 and cfg.model.width == 64
    json.dumps(cfg.__dict__, default=str)
