import json
import math
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from pruned_fixtures import encode_rows

from pipeline.config import ConfigError, JobError, load_config
from pipeline.loader import PrunedTokenDataset, PrunedTokenLoader
from pipeline.output.format import format_metadata
from pipeline.output.manifest import MANIFEST_SCHEMA
from pipeline.ray_train.vlm import resolve_input
from pipeline.ray_train.vlm import train_vlm as main
from pipeline.vlm.config import TrainVLMConfig
from pipeline.vlm.feed import CaptionCollator, CaptionLoss, image_token_id
from pipeline.vlm.train import (
    BATCH_LOG_ENV,
    PROJECTOR_FILE,
    endless,
    load_trained,
    load_vlm,
    make_optimizer,
    prepare_for_training,
    read_sidecar,
    train_steps,
)

REPO = Path(__file__).resolve().parent.parent
DIM, SIDE = 16, 3
CAPTIONS = ["a red square", "two blue dots", "a green line", "the yellow sun"]


def write_pruned_output(root: Path, n: int = 24, shards: int = 2) -> Path:
    """A compress output in the contract's format: anyres 1x2 / 2x1 grids, kept counts varying per sample;
    each caption has its own token direction, so the captions are learnable from the tokens."""
    output = root / "tiny" / "cfghash"
    meta = format_metadata(encoder="tiny", encoder_fingerprint="enc", select_layer=-2, dtype="float16", dim=DIM,
                           side=SIDE, selector="random", selector_fingerprint="sel", mode="ratio",
                           params={"ratio": 0.5}, cfg_hash="cfghash")
    generator = torch.Generator().manual_seed(0)
    directions = torch.randn(len(CAPTIONS), DIM, generator=generator)
    manifest = []
    for shard in range(shards):
        rows = range(shard * n // shards, (shard + 1) * n // shards)
        grids = [(1, 2) if i % 2 else (2, 1) for i in rows]
        n_tokens = 3 * SIDE * SIDE
        positions = [torch.randperm(n_tokens, generator=generator)[: 4 + i % 9].sort().values for i in rows]
        tokens = [directions[i % len(CAPTIONS)] + 0.1 * torch.randn(len(p), DIM, generator=generator)
                  for i, p in zip(rows, positions)]
        table = encode_rows(
            meta, keys=[f"k{i:03d}" for i in rows], source_shard=f"s{shard}", widths=[64] * len(rows),
            heights=[32] * len(rows), n_tokens=[n_tokens] * len(rows), tokens=tokens, positions=positions,
            grids=grids, passthrough={"caption": [CAPTIONS[i % len(CAPTIONS)] for i in rows]},
        )
        path = output / "data" / f"s{shard}.a0.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path, row_group_size=5)
        manifest.append({"shard_id": f"s{shard}", "path": f"data/{path.name}", "rows": len(rows),
                         "bytes": path.stat().st_size, "sha256": "", "source_fingerprint": "", "attempt": "a0"})
    pq.write_table(pa.Table.from_pylist(manifest, schema=MANIFEST_SCHEMA), output / "manifest.parquet")
    return output


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    return write_pruned_output(tmp_path_factory.mktemp("compressed"))


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory):
    """Ray for this module; its workers see a disarmed step failpoint (a failpoint fires only while its marker in
    ATR_FAILPOINT_DIR is absent: a test arms it by removing the marker) and log each step's batch keys."""
    hooks = tmp_path_factory.mktemp("hooks")
    (hooks / "ATR_FAIL_VLM_AFTER_STEPS").touch()
    env = {"ATR_FAILPOINT_DIR": str(hooks), "ATR_FAIL_VLM_AFTER_STEPS": "5", BATCH_LOG_ENV: str(hooks / "batches.jsonl")}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    yield hooks
    ray.shutdown()


def config(pruned: Path, output: Path, *overrides: str) -> TrainVLMConfig:
    return load_config(TrainVLMConfig, None, [
        f"input={pruned.parent.parent}", f"output={output}", "train.steps=20", "train.batch_size=6",
        "train.lr=3e-3", "train.warmup_steps=2", "train.log_every=5", "train.shuffle_buffer=8",
        "model.prompt=<image> caption",
        "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=1", *overrides,
    ])


def test_train_vlm_lowers_caption_loss_over_two_workers(pruned, tmp_path, ray_session):
    # A frozen random language model can barely be steered through its inputs, so the tiny run trains it too.
    cfg = config(pruned, tmp_path / "vlm", "train.language_model=true", "train.num_workers=2", "train.max_tokens=60")
    summary = main(cfg)
    assert summary["steps"] == 20 and summary["input"] == str(pruned)
    assert summary["final_loss"] < 0.8 * summary["first_loss"], summary
    assert summary["projector"] == f"{tmp_path}/vlm/checkpoint/{PROJECTOR_FILE}"

    sidecar = read_sidecar(summary["checkpoint"], {})
    assert sidecar["token_dim"] == DIM and sidecar["config"]["train"]["max_tokens"] == 60
    fresh, _ = load_vlm(cfg.model, DIM, SIDE)
    trained = load_trained(load_vlm(cfg.model, DIM, SIDE)[0], summary["checkpoint"])
    for module in (lambda m: m.model.multi_modal_projector.linear_1.weight, lambda m: m.model.image_newline,
                   lambda m: m.lm_head.weight, lambda m: m.model.language_model.layers[0].mlp.up_proj.weight):
        assert not torch.equal(module(trained), module(fresh))


def test_projector_stage_trains_only_projector_and_newline(pruned):
    cfg = config(pruned, pruned, "train.steps=2", "train.warmup_steps=0")
    model, tokenizer = load_vlm(cfg.model, DIM, SIDE)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    params = prepare_for_training(model, language_model=False)
    dataset = PrunedTokenDataset(str(pruned), shuffle_buffer=4, rank=0, world_size=1)
    loader = PrunedTokenLoader(dataset, batch_size=4,
                               collate_fn=CaptionCollator(tokenizer, image_token_id(model), True, cfg.model.prompt))
    optimizer, scheduler = make_optimizer(params, cfg.train)
    losses = train_steps(CaptionLoss(model), endless(loader), optimizer, scheduler, cfg.train,
                         device=torch.device("cpu"))
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {"model.image_newline", *(f"model.multi_modal_projector.linear_{i}.{kind}"
                                                  for i in (1, 2) for kind in ("weight", "bias"))}


def test_pretrained_model_loads_and_a_wrong_token_dim_fails_fast(pruned, tmp_path):
    cfg = load_config(TrainVLMConfig, None, ["model.hidden_size=16", "model.intermediate_size=32"])
    model, tokenizer = load_vlm(cfg.model, DIM + 4, SIDE)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    pretrained = replace(cfg.model, name_or_path=str(tmp_path / "model"), local_files_only=True)
    loaded, loaded_tokenizer = load_vlm(pretrained, DIM + 4, SIDE)
    assert torch.equal(loaded.model.image_newline, model.model.image_newline)
    assert loaded_tokenizer("a b")["input_ids"] == tokenizer("a b")["input_ids"]

    # The job checks the projector's width against the stored tokens before it starts any worker.
    wrong = config(pruned, tmp_path / "out", f"model.name_or_path={tmp_path / 'model'}", "model.local_files_only=true")
    with pytest.raises(ConfigError, match=f"projector takes {DIM + 4}-dim vision features, but the input's tokens "
                                          f"are {DIM}-dim"):
        main(wrong)
    with pytest.raises(ConfigError, match="model.name_or_path: cannot load"):
        main(config(pruned, tmp_path / "out", f"model.name_or_path={tmp_path / 'missing'}",
                    "model.local_files_only=true"))


def test_input_resolution_and_config_errors(pruned, tmp_path):
    assert resolve_input(str(pruned / "manifest.parquet"), {}) == str(pruned)
    assert resolve_input(str(pruned.parent.parent), {}) == str(pruned)
    with pytest.raises(ConfigError, match="no manifest.parquet"):
        resolve_input(str(tmp_path), {})
    write_pruned_output(tmp_path / "two", n=4, shards=1).rename(tmp_path / "two" / "tiny" / "other")
    write_pruned_output(tmp_path / "two", n=4, shards=1)
    with pytest.raises(ConfigError, match="several compress outputs"):
        resolve_input(str(tmp_path / "two"), {})
    assert load_config(TrainVLMConfig, "conf/train_vlm.yaml").train.language_model  # the packaged config
    with pytest.raises(ConfigError, match="model.prompt: must hold exactly one <image>"):
        load_config(TrainVLMConfig, None, ["model.prompt=no image here"])
    with pytest.raises(ConfigError, match="train.steps: must be a positive integer"):
        load_config(TrainVLMConfig, None, ["train.steps=0"])


def test_killed_train_vlm_resumes_without_repeating_or_skipping_a_batch(pruned, tmp_path, ray_session):
    # 24 samples in batches of 5: step 5 starts the second epoch, so the resume point at step 4 ends an epoch.
    steps, batch = 8, 5
    cfg = config(pruned, tmp_path / "vlm", f"train.steps={steps}", f"train.batch_size={batch}",
                 "train.checkpoint_every=2", "model.hidden_size=16", "model.intermediate_size=32")
    log = ray_session / "batches.jsonl"
    seen = len(log.read_text().splitlines()) if log.exists() else 0

    def logged() -> list[dict]:
        return [json.loads(line) for line in log.read_text().splitlines()[seen:]]

    (ray_session / "ATR_FAIL_VLM_AFTER_STEPS").unlink()  # armed: the worker process dies after step 5
    with pytest.raises(JobError):
        main(cfg)
    first = logged()
    assert [entry["step"] for entry in first] == [1, 2, 3, 4, 5]  # past the resume point at step 4
    summary = main(cfg)  # the failpoint fired once; this run resumes and goes to the end
    second = logged()[len(first):]
    assert [entry["step"] for entry in second] == [5, 6, 7, 8]  # step 5's update was lost with the process
    assert summary["steps"] == steps

    dataset = PrunedTokenDataset(str(pruned), seed=0, shuffle_buffer=8, columns=["caption"], rank=0, world_size=1)
    batches = endless(PrunedTokenLoader(dataset, batch_size=batch))
    expected = [next(batches)["keys"] for _ in range(steps)]  # what an uninterrupted run draws
    assert [entry["keys"] for entry in first[:4] + second] == expected
