import pytest
import torch

from pipeline.loader.collate import pack_collate, pad_collate
from pipeline.output.format import dequantize, quantize
from pipeline.vlm.config import VLMModelConfig
from pipeline.vlm.feed import (
    IGNORE_INDEX,
    NEWLINE,
    CaptionCollator,
    CaptionLoss,
    build_vlm_inputs,
    image_layout,
    image_newline,
    image_token_id,
    tokenize_prompts,
    vlm_core,
)
from pipeline.vlm.train import byte_tokenizer, tiny_vlm

DIM, SIDE = 12, 3
PER_TILE = SIDE * SIDE
PROMPT = "USER: <image>\nSay. ASSISTANT: "


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def make_model(tokenizer, family="llava_next"):
    cfg = VLMModelConfig(family=family, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    model = tiny_vlm(cfg, DIM, SIDE, len(tokenizer), tokenizer.convert_tokens_to_ids("<image>"))
    return model.eval()


def sample(key, positions, grid, caption):
    positions = torch.tensor(positions, dtype=torch.int64)
    tiles = 1 + grid[0] * grid[1] if grid[0] else 1
    return {"key": key, "tokens": torch.randn(len(positions), DIM), "positions": positions,
            "n_tokens": tiles * PER_TILE, "grid": grid, "side": SIDE, "caption": caption}


def hf_order(model, grid):
    """The order LLaVA-NeXT's own pack_image_features gives every token of a full, unpadded image:
    features are the flat positions themselves, the newline is NEWLINE."""
    rows, cols = grid
    tiles = 1 + rows * cols if rows else 1
    size = model.config.vision_config.image_size
    positions = torch.arange(tiles * PER_TILE, dtype=torch.float32).reshape(tiles, PER_TILE, 1)
    image_size = torch.tensor([rows * size, cols * size]) if rows else torch.tensor([size, size])
    extra = {"vision_feature_select_strategy": "default"} if model.config.model_type == "llava_next" else {}
    packed, _ = vlm_core(model).pack_image_features([positions], image_size[None],
                                                    image_newline=torch.tensor([float(NEWLINE)]), **extra)
    return packed[0].flatten().long().tolist()


def pruned_reference(full_order, kept):
    """The full order with dropped tokens removed, and newlines only after rows that kept a token."""
    out, row_has_token = [], False
    for slot in full_order:
        if slot == NEWLINE:
            if row_has_token:
                out.append(NEWLINE)
            row_has_token = False
        elif slot in kept:
            out.append(slot)
            row_has_token = slot >= PER_TILE or row_has_token
    return out


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
@pytest.mark.parametrize("grid", [(1, 2), (2, 1), (2, 2)])
def test_layout_follows_llava_next_pack_order_for_kept_tokens(tokenizer, grid, family):
    model = make_model(tokenizer, family)
    full = hf_order(model, grid)
    n_tokens = (1 + grid[0] * grid[1]) * PER_TILE
    assert image_layout(torch.arange(n_tokens), grid, SIDE).tolist() == [
        NEWLINE if s == NEWLINE else s for s in full
    ]
    generator = torch.Generator().manual_seed(sum(grid))
    positions = torch.arange(n_tokens)
    tile = positions // PER_TILE
    canvas_row = ((tile - 1) // grid[1]) * SIDE + (positions % PER_TILE) // SIDE
    # A random 40%, with canvas row 1 dropped whole, and row 0 keeping at least one token.
    keep = (torch.rand(n_tokens, generator=generator) < 0.4) & ~((tile > 0) & (canvas_row == 1))
    keep[PER_TILE] = True
    kept = positions[keep]
    layout = image_layout(kept, grid, SIDE)
    as_positions = [NEWLINE if i == NEWLINE else int(kept[i]) for i in layout.tolist()]
    assert as_positions == pruned_reference(full, set(kept.tolist()))
    assert (layout == NEWLINE).sum() < grid[0] * SIDE  # the emptied row has no newline


def test_plain_image_gets_one_trailing_newline_like_llava_next(tokenizer):
    model = make_model(tokenizer)
    assert hf_order(model, (0, 0)) == list(range(PER_TILE)) + [NEWLINE]
    assert image_layout(torch.tensor([7, 2, 5]), (0, 0), SIDE).tolist() == [1, 2, 0, NEWLINE]
    assert image_layout(torch.tensor([7, 2, 5]), (0, 0), SIDE, newline=False).tolist() == [1, 2, 0]
    with pytest.raises(ValueError, match="outside the 1 tile"):
        image_layout(torch.tensor([PER_TILE]), (0, 0), SIDE)


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
@pytest.mark.parametrize("collate", [pad_collate, pack_collate])
def test_inputs_embeds_hold_projected_kept_tokens_and_newlines(tokenizer, family, collate):
    model = make_model(tokenizer, family)
    samples = [
        sample("a", [0, 4, 8, 10, 12, 19, 20], (1, 2), "red cat"),
        sample("b", [3], (0, 0), "a dog on grass"),
        sample("c", [1, 2, 5, 9, 17, 26, 27, 35, 44], (2, 2), "x"),
    ]
    batch = collate(samples)
    with torch.no_grad():
        inputs = build_vlm_inputs(model, batch, tokenizer, prompt=PROMPT)
        projector = vlm_core(model).multi_modal_projector
        newline = image_newline(model)
        embed = model.get_input_embeddings()
        prefix = tokenizer("USER: ")["input_ids"]
        suffix = tokenizer("\nSay. ASSISTANT: ", add_special_tokens=False)["input_ids"]
        lengths = []
        for i, s in enumerate(samples):
            layout = image_layout(s["positions"], s["grid"], SIDE)
            projected = projector(s["tokens"])
            expected = torch.stack([newline if j == NEWLINE else projected[j] for j in layout.tolist()])
            start = len(prefix)
            image = inputs.inputs_embeds[i, start:start + len(layout)]
            torch.testing.assert_close(image, expected)
            caption = tokenizer(s["caption"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids = prefix + [image_token_id(model)] * len(layout) + suffix + caption
            assert inputs.input_ids[i, :len(ids)].tolist() == ids
            torch.testing.assert_close(inputs.inputs_embeds[i, :start], embed(torch.tensor(prefix)))
            text_end = start + len(layout) + len(suffix) + len(caption)
            torch.testing.assert_close(inputs.inputs_embeds[i, start + len(layout):text_end],
                                       embed(torch.tensor(suffix + caption)))
            assert inputs.attention_mask[i].tolist() == [1] * len(ids) + [0] * (inputs.input_ids.shape[1] - len(ids))
            labels = inputs.labels[i].tolist()
            assert labels == [IGNORE_INDEX] * (len(ids) - len(caption)) + caption + [IGNORE_INDEX] * (
                len(labels) - len(ids))
            lengths.append(len(layout))
    # Image lengths follow the kept counts: plain 1 token + newline; anyres tokens + one newline per kept row.
    assert inputs.image_lengths.tolist() == lengths == [7 + 2, 1 + 1, 9 + 4]
    assert model(**inputs.model_kwargs()).loss.isfinite()


def test_left_padding_and_no_labels_for_generation(tokenizer):
    text = tokenize_prompts(tokenizer, [2, 5], 3, prompt="<image> hi", padding_side="left")
    assert text.labels is None
    assert text.attention_mask.tolist()[0][:3] == [0, 0, 0] and text.attention_mask[1].all()
    assert text.input_ids[0, -6:-3].tolist() == [1, 3, 3]  # BOS even before a leading <image>

    model = make_model(tokenizer)
    batch = pad_collate([sample("a", [0, 1], (0, 0), "ignored"), sample("b", [4], (0, 0), "ignored")])
    with torch.no_grad():
        inputs = build_vlm_inputs(model, batch, tokenizer, prompt="<image> hi", for_generation=True)
        assert inputs.labels is None and "labels" not in inputs.model_kwargs()
        assert inputs.attention_mask.tolist() == [[1] * 7, [0] + [1] * 6]  # 2 tokens + newline vs 1 + newline
        generated = model.generate(**inputs.model_kwargs(), max_new_tokens=2, do_sample=False)
    assert generated.shape == (2, 2)
    with pytest.raises(ValueError, match="exactly one '<image>'"):
        tokenize_prompts(tokenizer, [1], 3, prompt="no placeholder")


def test_collator_and_loss_module_match_build_vlm_inputs(tokenizer):
    model = make_model(tokenizer)
    samples = [sample("a", [0, 9, 10, 30], (2, 2), "one"), sample("b", [1, 2], (0, 0), "two words")]
    collator = CaptionCollator(tokenizer, image_token_id(model), True, PROMPT)
    batch = collator(samples)
    with torch.no_grad():
        expected = model(**build_vlm_inputs(model, pad_collate(samples), tokenizer, prompt=PROMPT).model_kwargs()).loss
        torch.testing.assert_close(CaptionLoss(model)(batch), expected)


def test_token_dim_mismatch_is_a_clear_error(tokenizer):
    model = make_model(tokenizer)
    batch = pad_collate([sample("a", [0], (0, 0), "c")])
    batch["tokens"] = torch.randn(1, 1, DIM + 1)
    with pytest.raises(ValueError, match=f"dim {DIM + 1}, but the model's projector expects {DIM}"):
        build_vlm_inputs(model, batch, tokenizer)


@pytest.mark.parametrize("collate", [pad_collate, pack_collate])
def test_quantized_tokens_as_stored_are_rescaled_in_the_feed(tokenizer, collate):
    """int8 values and their token_scales cross to the device as stored; the feed rescales them there."""
    model = make_model(tokenizer)
    floats = [sample("a", [0, 4, 8], (0, 0), "red cat"), sample("b", [1, 2, 5, 7], (0, 0), "dog")]
    stored = []
    for s in floats:
        values, scales = quantize(s["tokens"], "int8")
        s["tokens"] = dequantize(values, scales)  # the float32 reference the stored values stand for
        stored.append({**s, "tokens": values, "token_scales": scales})
    batch = collate(stored)
    assert batch["tokens"].dtype == torch.int8 and batch["token_scales"].shape[0] == batch["tokens"].shape[0]
    with torch.no_grad():
        got = build_vlm_inputs(model, batch, tokenizer, prompt=PROMPT).inputs_embeds
        want = build_vlm_inputs(model, collate(floats), tokenizer, prompt=PROMPT).inputs_embeds
    torch.testing.assert_close(got, want)
