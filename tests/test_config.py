import dataclasses
import json
import subprocess
import sys
import typing
from pathlib import Path
from typing import Literal

import pytest

from pipeline.compress.plan import output_fingerprint_payload
from pipeline.config import (
    CompressConfig,
    ConfigError,
    CorpusConfig,
    EncoderConfig,
    SelectorConfig,
    TrainConfig,
    TrainSelectorConfig,
    load_config,
    preset_names,
    stable_hash,
)
from pipeline.evaluation.config import EvaluateConfig, EvaluateVLMConfig, ProbeConfig
from pipeline.output.gc import GcConfig
from pipeline.vlm.config import TrainVLMConfig, VLMTrainConfig

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
        (["selector.mode=sometimes"], "selector.mode: got 'sometimes', expected one of 'threshold', 'ratio', 'budget', 'error'"),
        (["encoder.batch_size=many"], "encoder.batch_size: got 'many', expected an integer"),
        (["dry_run=3"], "dry_run: got 3, expected true or false"),
        (["encoder=nonexistent"], "encoder: unknown preset 'nonexistent'; allowed: clip-vit-l-336"),
        (["selector.ratio=1.5"], "selector.ratio: must be in (0, 1]"),
        (["encoder.image_size=8"], "encoder.image_size: must be at least patch_size"),
        (["ray.num_actors_min=4"], "ray.num_actors_min: need 1 <= num_actors_min <= num_actors_max"),
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


JOB_CONFIGS = [CompressConfig, TrainSelectorConfig, EvaluateConfig, EvaluateVLMConfig, TrainVLMConfig, GcConfig,
               CorpusConfig]


@pytest.mark.parametrize("cls", JOB_CONFIGS, ids=lambda cls: cls.__name__)
def test_every_job_config_builds_from_its_defaults(cls):
    # Defaults build every sub-config through its default_factory, each checked by its __post_init__.
    assert cls() == load_config(cls) == dataclasses.replace(cls())


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: dataclasses.replace(SelectorConfig(), mode="sometimes"),
         "selector.mode: got 'sometimes', expected one of 'threshold', 'ratio', 'budget', 'error'"),
        (lambda: SelectorConfig(mode="ratio", ratio=1.5), "selector.ratio: must be in (0, 1], got 1.5"),
        (lambda: dataclasses.replace(EncoderConfig(), image_size=8),
         "encoder.image_size: must be at least patch_size (16), got 8"),
        (lambda: dataclasses.replace(EncoderConfig(), resize_mode="stretch"),
         "encoder.resize_mode: got 'stretch', expected one of 'shortest_edge_crop', 'squash', 'pad'"),
        (lambda: TrainConfig(lr=0.0), "train.lr: must be positive, got 0.0"),
        (lambda: TrainSelectorConfig(train=TrainConfig(steps=50)),
         "train.selector_warmup_steps: must be in [0, steps=50), got 100"),
        (lambda: VLMTrainConfig(shuffle_buffer=0), "train.shuffle_buffer: must be a positive integer"),
        (lambda: ProbeConfig(width=6), "probe.width: must be a multiple of heads (4), got 6"),
        (lambda: dataclasses.replace(CompressConfig(), executor="nowhere"),
         "executor: got 'nowhere', expected one of 'ray', 'local'"),
        (lambda: EvaluateConfig(methods=["learned", "bogus"]),
         ("methods[1]: got 'bogus', expected one of 'learned', 'learned_oneshot', 'none', 'random', 'uniform', 'norm', "
          "'cls_attention', 'diversity', 'oracle'")),
        (lambda: GcConfig(grace_hours=-1), "grace_hours: must be >= 0 (hours an unreferenced file is left alone)"),
        (lambda: CorpusConfig(heldout_fraction=1.0), "heldout_fraction: got 1.0, expected a number in [0, 1)"),
    ],
)
def test_configs_made_in_code_are_checked_too(make, message):
    with pytest.raises(ConfigError) as info:
        make()
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("cls", "yaml", "overrides", "message"),
    [
        (CompressConfig, None, ["selector.mode=sometimes"],
         "selector.mode: got 'sometimes', expected one of 'threshold', 'ratio', 'budget', 'error'"),
        (CompressConfig, None, ["selector.ratio=1.5"], "selector.ratio: must be in (0, 1], got 1.5"),
        (TrainSelectorConfig, None, ["train.lr=-1"], "train.lr: must be positive, got -1.0"),
        # A job config's check of its sub-config's field names it in full.
        (TrainSelectorConfig, None, ["train.steps=50"],
         "train.selector_warmup_steps: must be in [0, steps=50), got 100"),
        (TrainSelectorConfig, None, ["train.selector_warmup_steps=-1"],
         "train.selector_warmup_steps: must be in [0, steps=300), got -1"),
        (TrainSelectorConfig, None, ["model.width=10"],
         "model.width: must be a positive multiple of num_heads=4, got 10"),
        (EvaluateConfig, None, ["probe.width=6"], "probe.width: must be a multiple of heads (4), got 6"),
        # An InputConfig under probe.train_input is named there, not under its usual section (input).
        (EvaluateConfig, "probe:\n  train_input:\n    path: ''\n", [],
         "probe.train_input.path: must name a file, glob, brace pattern or folder (local or s3://)"),
        (EvaluateConfig, None, ["probe.train_input.folder_shard_size=0"],
         "probe.train_input.folder_shard_size: must be a positive integer"),
        (EvaluateVLMConfig, None, ["keep_ratios=[0.5,2]"], "keep_ratios: must be numbers in (0, 1], got [0.5, 2.0]"),
        (TrainVLMConfig, None, ["train.max_tokens=0"], "train.max_tokens: must be a positive integer or null"),
        (GcConfig, None, ["grace_hours=-1"], "grace_hours: must be >= 0 (hours an unreferenced file is left alone)"),
    ],
)
def test_nested_load_config_errors_name_the_full_dotted_key_once(tmp_path, cls, yaml, overrides, message):
    path = None
    if yaml:
        path = tmp_path / "c.yaml"
        path.write_text(yaml)
    with pytest.raises(ConfigError) as info:
        load_config(cls, str(path) if path else None, overrides)
    assert str(info.value) == message


def test_learned_without_a_checkpoint_is_refused_where_the_selector_is_built():
    # The default selector is method=learned without a checkpoint (it has no default), so a config cannot refuse
    # it; build_selector does, before compress encodes anything.
    from pipeline.selector import build_selector

    cfg = load_config(CompressConfig, None, ["selector.method=learned"])
    with pytest.raises(ConfigError, match="selector.checkpoint: method=learned needs a checkpoint"):
        build_selector(cfg.selector, None)


def test_evaluations_refuse_a_missing_checkpoint_before_loading_anything():
    from pipeline.evaluation.runner import evaluate
    from pipeline.evaluation.vlm_runner import evaluate_vlm

    with pytest.raises(ConfigError, match="selector.checkpoint: the evaluation needs a trained selector"):
        evaluate(EvaluateConfig(encoder=EncoderConfig(pretrained="/nonexistent")))
    with pytest.raises(ConfigError, match="selector.checkpoint: method learned needs selector.checkpoint=PATH"):
        evaluate_vlm(EvaluateVLMConfig(benchmark="/nonexistent.jsonl"))
    evaluate_vlm_without_learned = EvaluateVLMConfig(benchmark="/nonexistent.jsonl", methods=["none", "random"])
    with pytest.raises(ConfigError, match="benchmark"):  # no checkpoint needed: it gets as far as the benchmark
        evaluate_vlm(evaluate_vlm_without_learned)


def test_input_and_output_urls_are_shorthands_for_their_path_where_the_section_has_one():
    cfg = load_config(CompressConfig, None, ["input=s3://b/in/{000..009}.tar", "input.format=webdataset",
                                             "output=s3://b/out", "output.dtype=float32"])
    assert (cfg.input.path, cfg.input.format) == ("s3://b/in/{000..009}.tar", "webdataset")
    assert (cfg.output.path, cfg.output.dtype) == ("s3://b/out", "float32")
    train = load_config(TrainSelectorConfig, None, ["input=/data/train", "output=/runs/sel"])
    assert (train.input.path, train.output) == ("/data/train", "/runs/sel")  # output is a plain path here
    evaluate = load_config(EvaluateConfig, None, ["probe.train_input=/data/train"])
    assert evaluate.probe.train_input.path == "/data/train"
    with pytest.raises(ConfigError, match="encoder: unknown preset"):
        load_config(CompressConfig, None, ["encoder=s3://not-a-preset"])


@pytest.mark.parametrize("key", ["input.path", "output.path", "input", "output"])
def test_a_bare_scheme_names_no_bucket(key):
    with pytest.raises(ConfigError, match=r"path: 's3://' names no bucket"):
        load_config(CompressConfig, None, [f"{key}=s3://"])


def test_config_files_resolve_against_the_packaged_conf_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("conf/compress.yaml", "compress.yaml", "compress"):
        assert load_config(CompressConfig, name, []).executor == "ray"
    (tmp_path / "compress.yaml").write_text("executor: local\n")  # a file here wins over the packaged one
    assert load_config(CompressConfig, "compress.yaml", []).executor == "local"


def _leaf_fields(config, prefix=""):
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaf_fields(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", hints[f.name]


def _other_values(hint, value):
    """Valid-looking values other than ``value``, the first the config's checks accept is used."""
    choices = [c for c in typing.get_args(hint) if isinstance(c, str)] if typing.get_origin(hint) is Literal else []
    if choices:
        return [c for c in choices if c != value]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value - 1, value * 2]
    if isinstance(value, float):
        return [value / 2, value + 0.1, value * 2]
    if isinstance(value, list):
        return [[*value[:-1], [7, 7]] if value and isinstance(value[0], list) else [0.25, 0.25, 0.25]]
    return ["elsewhere/x", "s3://bucket/x"]


def test_every_field_is_fingerprinted_or_listed_as_not_changing_the_bytes():
    # By construction every field is in cfg_hash unless NOT_FINGERPRINTED names it; this keeps both sides true:
    # a listed field (or the mode parameter another mode reads) leaves the hash alone, any other field moves it.
    from pipeline.compress.plan import MODE_PARAMS, NOT_FINGERPRINTED, not_fingerprinted

    base_cfg = load_config(CompressConfig, None, BASELINE + ["input.root=/data/laion", "input.path=/data/laion"])
    base = stable_hash(output_fingerprint_payload(base_cfg, "enc-fp", "sel-fp"))
    leaves = dict(_leaf_fields(base_cfg))
    sections = {name.split(".")[0] for name in leaves}
    assert all(name in leaves or name in sections for name in NOT_FINGERPRINTED), "a stale NOT_FINGERPRINTED entry"
    assert {f"selector.{p}" for p in MODE_PARAMS.values()} <= set(leaves)
    skipped = not_fingerprinted(base_cfg)
    for name, hint in leaves.items():
        section, _, leaf = name.rpartition(".")
        for other in _other_values(hint, getattr(base_cfg if not section else getattr(base_cfg, section), leaf)):
            try:
                if section:
                    changed = dataclasses.replace(base_cfg, **{section: dataclasses.replace(
                        getattr(base_cfg, section), **{leaf: other})})
                else:
                    changed = dataclasses.replace(base_cfg, **{leaf: other})
            except (ConfigError, TypeError, ValueError):
                continue
            moved = stable_hash(output_fingerprint_payload(changed, "enc-fp", "sel-fp")) != base
            listed = name in skipped or section in skipped
            assert moved != listed, (f"{name}={other!r}: " + ("changes cfg_hash but is listed as not changing the "
                                     "bytes" if listed else "is in neither the fingerprint nor NOT_FINGERPRINTED"))
            break
        else:
            assert name in skipped or section in skipped, f"no other valid value for {name} to check"


def test_the_pattern_is_not_the_dataset_identity_but_the_compute_dtype_is():
    def cfg_hash(*overrides):
        return fingerprint(list(overrides))

    spellings = ["input.path=/data/laion", "input.path=/data/laion/*.tar", "input.path=/data/laion/{00000..00999}.tar",
                 "input.path=/data/laion/{00000..01999}.tar", "input.path=/data/laion/0000{0..9}.tar"]
    assert len({cfg_hash(s) for s in spellings}) == 1
    assert cfg_hash("input.path=/data/coyo/*.tar") != cfg_hash(spellings[0])
    assert cfg_hash("input.path=/data/coyo/*.tar", "input.root=/data/laion") == cfg_hash(spellings[0])
    # auto resolves to bfloat16 on GPU actors: the same as asking for it, not the same as a CPU run.
    gpu = cfg_hash("ray.num_gpus_per_actor=1")
    assert gpu == cfg_hash("encoder.dtype=bfloat16") != cfg_hash()
    assert cfg_hash("decode.device=cpu") == cfg_hash("decode.device=cuda")
