"""The selector package: the autoencoder's training mechanics, the inference policy, baselines, checkpoints."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import torch

from pipeline.config import (
    ConfigError,
    EncoderConfig,
    SelectorConfig,
    SelectorModelConfig,
    TrainConfig,
)
from pipeline.selector import build_selector, choose_tokens, select_tokens
from pipeline.selector.baselines import UniformSelector
from pipeline.selector.checkpoint import (
    checkpoint_dir,
    encoder_identity,
    latest_checkpoint,
    load_checkpoint,
    load_optimizer_state,
    save_checkpoint,
)
from pipeline.selector.loss import image_spread, reconstruction_error, selector_loss
from pipeline.selector.model import SelectorAutoencoder, normalize_tokens
from pipeline.selector.training import (
    make_optimizer,
    pad_token_sets,
    sample_batches,
    temperature_at,
    train_loop,
)

DIM = 24
MODEL = SelectorModelConfig(width=32, num_heads=4, max_positions=64)


def make_model(seed: int = 0) -> SelectorAutoencoder:
    torch.manual_seed(seed)
    return SelectorAutoencoder(DIM, MODEL)


def padded_batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    batch = pad_token_sets([torch.randn(n, DIM, generator=generator) for n in lengths])
    return batch.tokens, batch.mask


def structured_token_sets(count: int, seed: int) -> list[torch.Tensor]:
    """Images whose tokens are mostly one background vector plus a few distinct 'content' tokens."""
    generator = torch.Generator().manual_seed(seed)
    background = torch.randn(DIM, generator=generator)
    sets = []
    for _ in range(count):
        tokens = background.expand(16, DIM).clone() + 0.05 * torch.randn(16, DIM, generator=generator)
        content = torch.randperm(16, generator=generator)[:4]
        tokens[content] = 3 * torch.randn(4, DIM, generator=generator)
        sets.append(tokens)
    return sets


# --------------------------------------------------------------------------------------------- autoencoder


def test_gumbel_straight_through_gives_binary_masks_and_gradients_to_the_logits():
    model = make_model()
    torch.nn.init.normal_(model.selector.head.weight)  # the zero start would block gradients below the head
    tokens, mask = padded_batch([16, 11])
    output = model(tokens, mask, temperature=0.5)
    assert torch.allclose(output.keep, output.keep.round(), atol=1e-6)
    assert set(output.keep.round().unique().tolist()) == {0.0, 1.0}
    assert output.keep[~mask].abs().max() == 0
    # Reconstruction alone (no sparsity term) reaches the selector only through the straight-through mask.
    error = reconstruction_error(output.reconstruction, tokens, mask).mean()
    error.backward()
    head_grad = model.selector.head.weight.grad
    assert head_grad is not None and torch.isfinite(head_grad).all() and head_grad.abs().sum() > 0
    assert model.selector.transformer.blocks[0].qkv.weight.grad.abs().sum() > 0


def test_selector_starts_unbiased_and_kept_tokens_pass_through_the_reconstructor():
    model = make_model().eval()
    tokens, mask = padded_batch([12, 7])
    with torch.no_grad():
        assert torch.equal(model.selector.keep_probability(tokens, mask), torch.full(mask.shape, 0.5))
        keep = torch.rand(mask.shape) < 0.5
        rebuilt = model.reconstruct(tokens, mask, keep)
    kept = keep & mask
    assert torch.allclose(rebuilt[kept], normalize_tokens(tokens)[kept])
    assert not torch.allclose(rebuilt[~keep & mask], normalize_tokens(tokens)[~keep & mask])


def test_dropped_tokens_are_replaced_by_the_shared_mask_embedding():
    model = make_model().eval()
    tokens, mask = padded_batch([12])
    keep = torch.zeros(1, 12, dtype=torch.bool)
    keep[0, [1, 4, 5, 9]] = True
    inputs = model.reconstructor.masked_input(tokens, keep)
    dropped = inputs[0, ~keep[0]]
    assert torch.equal(dropped, model.reconstructor.mask_embedding.expand_as(dropped))
    expected_kept = model.reconstructor.proj_in(normalize_tokens(tokens))[0, keep[0]]
    assert torch.allclose(inputs[0, keep[0]], expected_kept)
    # Nothing of a dropped token leaks into the reconstruction.
    scrambled = tokens.clone()
    scrambled[0, ~keep[0]] = torch.randn_like(scrambled[0, ~keep[0]]) * 50
    with torch.no_grad():
        assert torch.allclose(model.reconstruct(tokens, mask, keep), model.reconstruct(scrambled, mask, keep), atol=1e-6)
        changed = tokens.clone()
        changed[0, 1] += 5
        assert not torch.allclose(model.reconstruct(tokens, mask, keep), model.reconstruct(changed, mask, keep))


def test_padding_does_not_change_a_real_tokens_scores():
    model = make_model().eval()
    tokens, mask = padded_batch([10, 16])
    with torch.no_grad():
        alone = model.selector.keep_probability(tokens[:1, :10], mask[:1, :10])
        batched = model.selector.keep_probability(tokens, mask)
    assert torch.allclose(alone[0], batched[0, :10], atol=1e-5)


def test_loss_is_independent_of_the_encoders_feature_scale():
    model = make_model()
    tokens, mask = padded_batch([16, 16])
    settings = dict(kind="mse", sparsity_weight=0.5, target_keep_rate=None, relative_error_floor=0.02)
    torch.manual_seed(3)
    small = selector_loss(model(tokens, mask, 1.0), tokens, mask, **settings)
    torch.manual_seed(3)
    large = selector_loss(model(tokens * 100, mask, 1.0), tokens * 100, mask, **settings)
    assert math.isclose(small.as_floats()["loss"], large.as_floats()["loss"], rel_tol=1e-4)


def test_sparsity_is_the_mean_keep_probability_or_its_distance_to_a_target():
    model = make_model()
    tokens, mask = padded_batch([16])
    output = model(tokens, mask, 1.0)
    plain = selector_loss(output, tokens, mask, kind="cosine", sparsity_weight=2.0, target_keep_rate=None,
                          relative_error_floor=None).as_floats()
    assert math.isclose(plain["keep_probability"], 0.5, rel_tol=1e-6)
    assert math.isclose(plain["loss"], plain["recon_error"] + 2.0 * 0.5, rel_tol=1e-5)
    targeted = selector_loss(output, tokens, mask, kind="cosine", sparsity_weight=2.0, target_keep_rate=0.25,
                             relative_error_floor=None).as_floats()
    assert math.isclose(targeted["sparsity"], 0.25**2, rel_tol=1e-5)
    assert math.isclose(targeted["loss"], targeted["recon_error"] + 2.0 * 0.25**2, rel_tol=1e-5)


def test_the_selector_is_held_back_during_its_warm_up():
    model = make_model()
    selector_before = [p.detach().clone() for p in model.selector.parameters()]
    reconstructor_before = [p.detach().clone() for p in model.reconstructor.parameters()]
    snapshots = []

    def snapshot(metrics):
        snapshots.append([p.detach().clone() for p in model.selector.parameters()])

    cfg = TrainConfig(steps=4, batch_size=4, warmup_steps=1, log_every=2, selector_warmup_steps=2)
    train_loop(model, sample_batches(structured_token_sets(8, 0), 4, seed=0), cfg, on_log=snapshot)
    assert all(torch.equal(a, b) for a, b in zip(selector_before, snapshots[0]))
    assert not all(torch.equal(a, b) for a, b in zip(selector_before, snapshots[1]))
    assert not all(torch.equal(a, p) for a, p in zip(reconstructor_before, model.reconstructor.parameters()))


def test_relative_error_weighs_each_image_by_its_own_spread():
    generator = torch.Generator().manual_seed(0)
    flat = torch.randn(1, DIM, generator=generator).expand(16, DIM)
    busy = torch.randn(16, DIM, generator=generator)
    batch = pad_token_sets([flat + 0.01 * torch.randn(16, DIM, generator=generator), busy])
    spread = image_spread(batch.tokens, batch.mask)
    assert spread[0] < 0.01 and 0.85 < spread[1] < 1.0
    # The same reconstruction error costs the flat image far more than the busy one.
    model = make_model()
    output = model(batch.tokens, batch.mask, 1.0)
    errors = reconstruction_error(output.reconstruction, batch.tokens, batch.mask)
    terms = selector_loss(output, batch.tokens, batch.mask, kind="mse", sparsity_weight=0.0, target_keep_rate=None,
                          relative_error_floor=0.02).as_floats()
    expected = float((errors / (spread + 0.02)).mean().detach())
    assert math.isclose(terms["relative_error"], expected, rel_tol=1e-5) and math.isclose(terms["loss"], expected, rel_tol=1e-5)
    assert math.isclose(terms["recon_error"], float(errors.mean().detach()), rel_tol=1e-5)


def test_temperature_anneals_from_start_to_end():
    for schedule in ("exponential", "cosine"):
        cfg = TrainConfig(steps=11, temperature_start=2.0, temperature_end=0.2, temperature_schedule=schedule)
        values = [temperature_at(step, cfg) for step in range(cfg.steps)]
        assert math.isclose(values[0], 2.0) and math.isclose(values[-1], 0.2)
        assert all(a > b for a, b in zip(values, values[1:]))


def test_a_short_training_run_lowers_the_loss_and_the_reconstruction_error():
    model = make_model()
    cfg = TrainConfig(steps=60, batch_size=8, lr=3e-3, warmup_steps=5, selector_warmup_steps=10, log_every=10,
                      sparsity_weight=0.2)
    logged: list[dict[str, float]] = []
    final = train_loop(model, sample_batches(structured_token_sets(32, 0), 8, seed=0), cfg, on_log=logged.append)
    assert [m["step"] for m in logged] == [10, 20, 30, 40, 50, 60]
    assert final == logged[-1]
    assert logged[-1]["loss"] < 0.8 * logged[0]["loss"]
    assert logged[-1]["recon_error"] < 0.8 * logged[0]["recon_error"]
    assert 0 < logged[-1]["keep_rate"] < 1


# --------------------------------------------------------------------------------------------- inference policy


def kept_positions(keep: torch.Tensor, row: int) -> list[int]:
    return keep[row].nonzero().flatten().tolist()


def test_threshold_mode_keeps_a_count_that_varies_with_the_image():
    scores = torch.tensor([[0.9, 0.1, 0.7, 0.6, 0.2], [0.1, 0.2, 0.3, 0.95, 0.4]])
    mask = torch.ones_like(scores, dtype=torch.bool)
    keep = select_tokens(scores, mask, SelectorConfig(mode="threshold", threshold=0.5, min_tokens=1))
    assert kept_positions(keep, 0) == [0, 2, 3]
    assert kept_positions(keep, 1) == [3]


def test_ratio_and_budget_keep_exact_counts_in_original_order_and_never_padding():
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 20, generator=generator)
    mask = torch.ones(3, 20, dtype=torch.bool)
    mask[1, 13:] = False
    mask[2, 7:] = False
    scores[~mask] = 10.0  # padding must lose even against real tokens it outscores
    lengths = [20, 13, 7]
    ratio = select_tokens(scores, mask, SelectorConfig(mode="ratio", ratio=0.3, min_tokens=1))
    budget = select_tokens(scores, mask, SelectorConfig(mode="budget", budget=9, min_tokens=1))
    for row, n in enumerate(lengths):
        assert ratio[row].sum() == math.ceil(0.3 * n)
        assert budget[row].sum() == min(9, n)
        assert not (ratio[row] & ~mask[row]).any() and not (budget[row] & ~mask[row]).any()
        top = scores[row, :n].topk(math.ceil(0.3 * n)).indices.sort().values.tolist()
        assert kept_positions(ratio, row) == top


def test_ratio_with_exact_product_does_not_round_up():
    mask = torch.ones(1, 10, dtype=torch.bool)
    keep = select_tokens(torch.rand(1, 10), mask, SelectorConfig(mode="ratio", ratio=0.3, min_tokens=0))
    assert keep.sum() == 3


def test_every_mode_respects_the_floor():
    scores = torch.tensor([[0.1, 0.3, 0.2, 0.05, 0.15, 0.0]])
    mask = torch.ones_like(scores, dtype=torch.bool)
    mask[0, 5] = False
    for cfg in (
        SelectorConfig(mode="threshold", threshold=0.9, min_tokens=2),
        SelectorConfig(mode="ratio", ratio=0.1, min_tokens=2),
        SelectorConfig(mode="budget", budget=1, min_tokens=2),
    ):
        assert kept_positions(select_tokens(scores, mask, cfg), 0) == [1, 2]
    # A floor above the image's token count keeps every real token and no padding.
    keep = select_tokens(scores, mask, SelectorConfig(mode="budget", budget=1, min_tokens=50))
    assert kept_positions(keep, 0) == [0, 1, 2, 3, 4]


def test_method_none_keeps_everything_in_any_mode():
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 5:] = False
    selector = build_selector(SelectorConfig(method="none"), None)
    scores = selector.scores(torch.randn(2, 8, 4), mask, keys=["a", "b"])
    for mode in ("threshold", "ratio", "budget"):
        cfg = SelectorConfig(method="none", mode=mode, ratio=0.1, budget=1, threshold=0.99)
        assert torch.equal(select_tokens(scores, mask, cfg), mask)


def test_bad_ratio_is_a_config_error():
    with pytest.raises(ConfigError, match="selector.ratio"):
        select_tokens(torch.rand(1, 4), torch.ones(1, 4, dtype=torch.bool), SelectorConfig(mode="ratio", ratio=1.5))


# --------------------------------------------------------------------------------------------- baselines


def test_random_is_reproducible_per_key_and_independent_of_the_batch():
    tokens, mask = padded_batch([16, 12, 16])
    random = build_selector(SelectorConfig(method="random", seed=7), None)
    batch = random.scores(tokens, mask, keys=["a", "b", "a"])
    alone = random.scores(tokens[1:2, :12], mask[1:2, :12], keys=["b"])
    assert torch.equal(batch[0], batch[2])
    assert torch.equal(batch[1, :12], alone[0])
    assert torch.isneginf(batch[1, 12:]).all()
    assert not torch.equal(batch[0, :12], batch[1, :12])
    other_seed = build_selector(SelectorConfig(method="random", seed=8), None).scores(tokens, mask, keys=["a", "b", "a"])
    assert not torch.equal(batch[0], other_seed[0])
    assert random.fingerprint() == "random:seed=7"


def grid_cells(keep_row: torch.Tensor, side: int) -> set[tuple[int, int]]:
    return {(int(p) // side, int(p) % side) for p in keep_row.nonzero().flatten()}


def test_uniform_keeps_a_spatial_stride_on_every_tile():
    side = 8
    tokens, mask = padded_batch([side * side])
    uniform = build_selector(SelectorConfig(method="uniform"), None)
    scores = uniform.scores(tokens, mask, keys=["x"])
    quarter = select_tokens(scores, mask, SelectorConfig(mode="ratio", ratio=0.25, min_tokens=0))
    assert grid_cells(quarter[0], side) == {(r, c) for r in range(0, side, 2) for c in range(0, side, 2)}
    sixteenth = select_tokens(scores, mask, SelectorConfig(mode="budget", budget=4, min_tokens=0))
    assert grid_cells(sixteenth[0], side) == {(0, 0), (0, 4), (4, 0), (4, 4)}
    # Three tiles (anyres): each gets the same stride.
    tiles, tile_mask = padded_batch([3 * side * side])
    tiled = UniformSelector(side).scores(tiles, tile_mask, keys=["x"])
    keep = select_tokens(tiled, tile_mask, SelectorConfig(mode="ratio", ratio=0.25, min_tokens=0))
    per_tile = keep[0].view(3, side * side)
    for tile in range(3):
        assert grid_cells(per_tile[tile], side) == grid_cells(quarter[0], side)


def test_uniform_on_multi_tile_images_without_the_side_is_a_config_error():
    tokens, mask = padded_batch([2 * 49])
    with pytest.raises(ConfigError, match="side"):
        UniformSelector(None).scores(tokens, mask, keys=["x"])


def test_norm_keeps_the_largest_tokens():
    tokens, mask = padded_batch([10])
    tokens[0, [2, 7]] *= 20
    scores = build_selector(SelectorConfig(method="norm"), None).scores(tokens, mask, keys=["x"])
    keep = select_tokens(scores, mask, SelectorConfig(mode="budget", budget=2))
    assert kept_positions(keep, 0) == [2, 7]
    assert scores.max() == 1.0


def test_cls_attention_uses_the_encoders_attention_and_needs_it():
    tokens, mask = padded_batch([6])
    attention = torch.tensor([[0.05, 0.4, 0.05, 0.3, 0.1, 0.1]])
    selector = build_selector(SelectorConfig(method="cls_attention"), None)
    keep = select_tokens(selector.scores(tokens, mask, keys=["x"], cls_attention=attention), mask,
                         SelectorConfig(mode="threshold", threshold=0.5))
    assert kept_positions(keep, 0) == [1, 3]
    with pytest.raises(ConfigError, match="CLS"):
        selector.scores(tokens, mask, keys=["x"])


def test_diversity_picks_one_token_per_cluster_before_any_duplicate():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(4, DIM, generator=generator) * 3
    assignment = torch.tensor([0, 0, 0, 1, 1, 2, 0, 0, 3, 3, 3, 0])
    tokens = (centres[assignment] + 0.01 * torch.randn(12, DIM, generator=generator))[None]
    mask = torch.ones(1, 12, dtype=torch.bool)
    scores = build_selector(SelectorConfig(method="diversity"), None).scores(tokens, mask, keys=["x"])
    keep = select_tokens(scores, mask, SelectorConfig(mode="budget", budget=4))
    assert sorted(assignment[keep[0]].tolist()) == [0, 1, 2, 3]
    # The scores order all tokens: distinct values, one per pick.
    assert len(set(scores[0].tolist())) == 12


# --------------------------------------------------------------------------------------------- checkpoints


ENCODER_FP = "a" * 64


def write_checkpoint(root: str, model: SelectorAutoencoder, step: int, storage_options=None) -> str:
    optimizer = make_optimizer(model, TrainConfig())
    return save_checkpoint(
        checkpoint_dir(root, step),
        model,
        step=step,
        encoder=encoder_identity(EncoderConfig(), ENCODER_FP, DIM),
        train={"steps": step},
        metrics={"loss": 0.5},
        optimizer_state=optimizer.state_dict(),
        storage_options=storage_options,
    )


def test_checkpoint_round_trip_gives_identical_scores(tmp_path: Path):
    model = make_model(seed=5)
    directory = write_checkpoint(str(tmp_path / "checkpoints"), model, step=40)
    tokens, mask = padded_batch([16, 9])
    expected = model.selector.eval().keep_probability(tokens, mask).detach()
    for path in (directory, f"{directory}/checkpoint.json", str(tmp_path / "checkpoints")):
        selector = build_selector(SelectorConfig(method="learned_oneshot", checkpoint=path), ENCODER_FP)
        scores = selector.scores(tokens, mask, keys=["a", "b"])
        assert torch.equal(scores[mask], expected[mask])
        assert torch.isneginf(scores[~mask]).all()
    weights = (Path(directory) / "model.safetensors").read_bytes()
    assert selector.fingerprint() == hashlib.sha256(weights).hexdigest()
    loaded = load_checkpoint(directory)
    assert loaded.step == 40 and loaded.meta["encoder"]["select_layer"] == EncoderConfig().select_layer
    assert load_optimizer_state(loaded)["param_groups"][0]["weight_decay"] == TrainConfig().weight_decay


def test_a_checkpoint_for_another_encoder_is_refused(tmp_path: Path):
    directory = write_checkpoint(str(tmp_path), make_model(), step=1)
    with pytest.raises(ConfigError) as error:
        build_selector(SelectorConfig(method="learned", checkpoint=directory), "b" * 64)
    assert "aaaaaaaaaaaa" in str(error.value) and "bbbbbbbbbbbb" in str(error.value)


def test_learned_without_checkpoint_and_missing_checkpoint_are_config_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match="selector.checkpoint"):
        build_selector(SelectorConfig(method="learned"), ENCODER_FP)
    with pytest.raises(ConfigError, match="no selector checkpoint"):
        build_selector(SelectorConfig(method="learned", checkpoint=str(tmp_path / "nothing")), ENCODER_FP)


def test_latest_checkpoint_skips_incomplete_directories_and_detects_corruption(tmp_path: Path):
    root = str(tmp_path / "checkpoints")
    model = make_model()
    write_checkpoint(root, model, step=10)
    last = write_checkpoint(root, model, step=20)
    assert latest_checkpoint(root) == last
    incomplete = Path(checkpoint_dir(root, 30))
    incomplete.mkdir()
    (incomplete / "model.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(root) == last
    weights = Path(last) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    with pytest.raises(ValueError, match="corrupt"):
        load_checkpoint(last)


def test_checkpoint_round_trip_through_s3(s3_options, s3_bucket):
    model = make_model(seed=2)
    root = f"s3://{s3_bucket}/run/checkpoints"
    write_checkpoint(root, model, step=3, storage_options=s3_options)
    directory = write_checkpoint(root, model, step=7, storage_options=s3_options)
    assert latest_checkpoint(root, s3_options) == directory
    selector = build_selector(SelectorConfig(method="learned_oneshot", checkpoint=root), ENCODER_FP,
                              storage_options=s3_options)
    tokens, mask = padded_batch([16])
    assert torch.equal(selector.scores(tokens, mask, keys=["a"]), model.selector.eval().keep_probability(tokens, mask).detach())


# --------------------------------------------------------------------------------------------- set-aware selection


def clustered_tokens(assignment: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(max(assignment) + 1, DIM, generator=generator) * 3
    index = torch.tensor(assignment)
    tokens = (centres[index] + 0.01 * torch.randn(len(assignment), DIM, generator=generator))[None]
    return tokens, torch.ones(1, len(assignment), dtype=torch.bool)


def test_set_aware_learned_keeps_one_token_per_group_where_one_shot_keeps_a_redundant_group(tmp_path: Path):
    # An untrained selector scores every token 1/2: the one-shot top-k takes the first tokens, one group here;
    # the set-aware order weighs each candidate by its distance to what is kept, so every group gets one.
    directory = write_checkpoint(str(tmp_path), make_model(seed=1), step=1)
    assignment = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 0, 0, 1, 1]
    tokens, mask = clustered_tokens(assignment)
    budget = SelectorConfig(mode="budget", budget=4)
    groups = torch.tensor(assignment)
    oneshot = build_selector(SelectorConfig(method="learned_oneshot", checkpoint=directory), ENCODER_FP)
    _, keep = choose_tokens(oneshot, tokens, mask, budget, keys=["x"])
    assert sorted(groups[keep[0]].tolist()) == [0, 0, 0, 0]
    learned = build_selector(SelectorConfig(method="learned", checkpoint=directory), ENCODER_FP)
    scores, keep = choose_tokens(learned, tokens, mask, budget, keys=["x"])
    assert sorted(groups[keep[0]].tolist()) == [0, 1, 2, 3]
    # Its scores are a picking order: distinct, and a ratio cut of them is the ratio mode's selection.
    assert len(set(scores[0].tolist())) == len(assignment)
    ratio = SelectorConfig(mode="ratio", ratio=0.3)
    assert torch.equal(choose_tokens(learned, tokens, mask, ratio, keys=["x"])[1], select_tokens(scores, mask, ratio))


def test_set_aware_picking_order_is_a_permutation_that_ignores_padding(tmp_path: Path):
    directory = write_checkpoint(str(tmp_path), make_model(seed=2), step=1)
    learned = build_selector(SelectorConfig(method="learned", checkpoint=directory), ENCODER_FP)
    tokens, mask = padded_batch([20, 13])
    ranks = learned.picking_order(tokens, mask)
    for row, n in enumerate([20, 13]):
        assert sorted(ranks[row, :n].tolist()) == list(range(n))
    alone = learned.picking_order(tokens[1:, :13], mask[1:, :13])
    assert torch.equal(alone[0], ranks[1, :13])


def test_error_mode_keeps_each_image_within_its_bound_and_a_looser_bound_keeps_fewer(tmp_path: Path):
    model = make_model(seed=3).eval()
    sets = structured_token_sets(6, seed=4)
    directory = write_checkpoint(str(tmp_path), model, step=1)
    tokens, mask = pad_token_sets(sets[:6]).tokens, pad_token_sets(sets[:6]).mask
    counts = {}
    for method in ("learned", "learned_oneshot"):
        selector = build_selector(SelectorConfig(method=method, checkpoint=directory), ENCODER_FP)
        for bound in (0.1, 0.5):
            cfg = SelectorConfig(method=method, mode="error", max_error=bound, min_tokens=1)
            _, keep = choose_tokens(selector, tokens, mask, cfg, keys=[])
            error = reconstruction_error(model.reconstruct(tokens, mask, keep), tokens, mask) / image_spread(tokens, mask)
            assert (error <= bound + 1e-5).all()
            counts[method, bound] = keep.sum(1)
        assert (counts[method, 0.5] <= counts[method, 0.1]).all() and (counts[method, 0.5] < 16).all()


def test_error_mode_needs_a_learned_method():
    with pytest.raises(ConfigError, match="mode"):
        SelectorConfig(method="diversity", mode="error").check()
    with pytest.raises(ConfigError, match="max_error"):
        SelectorConfig(method="learned", mode="error", max_error=1.5).check()
