"""Vision encoders: token geometry, layer selection, seeded init, checkpoints, processor parity, token boxes."""

from __future__ import annotations

import copy
import dataclasses
import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    LlavaNextImageProcessorPil,
    SiglipImageProcessorPil,
)

from pipeline.config import CompressConfig, ConfigError, EncoderConfig, load_config
from pipeline.encoders import (
    VisionEncoder,
    normalize_pixels,
    prepare_image,
    token_boxes,
)
from pipeline.encoders.tower import resolve_device, weights_fingerprint

# The "tiny" preset's geometry (224 px, patch 16, 14 x 14 tokens) with a narrower tower, for speed.
CLIP_TINY = EncoderConfig(hidden_size=64, num_layers=3, num_heads=2, intermediate_size=128, device="cpu", batch_size=4)
# 96 / 14 leaves 12 pixels unused, as SigLIP-so400m's 384 / 14 does.
SIGLIP_TINY = EncoderConfig(
    name="siglip-tiny", family="siglip", image_size=96, patch_size=14, hidden_size=64, num_layers=3, num_heads=2,
    intermediate_size=128, resize_mode="squash", image_mean=[0.5] * 3, image_std=[0.5] * 3, device="cpu",
    batch_size=4, image_grid_pinpoints=[[192, 192], [96, 192], [192, 96], [96, 288], [288, 96]],
)
# Processor parity: prepare + normalise against transformers' PIL processors. Both apply the same PIL bicubic
# resizes to the same uint8 image and the same float32 arithmetic; the measured max abs difference is 0.0.
PROCESSOR_TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def clip_encoder():
    return VisionEncoder.from_config(CLIP_TINY)


@pytest.fixture(scope="module")
def siglip_encoder():
    return VisionEncoder.from_config(SIGLIP_TINY)


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour gradients, shapes, text and sensor noise, through a JPEG round trip."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [0.5 + 0.4 * np.sin(6 * x + 2 * y), 0.5 + 0.4 * np.cos(4 * y - 3 * x), 0.5 + 0.3 * np.sin(9 * x * y)]
    base = np.stack(channels, -1)
    pixels = (base * 255 + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    draw.ellipse([width * 0.2, height * 0.3, width * 0.5, height * 0.8], fill=(200, 40, 40))
    draw.rectangle([width * 0.6, height * 0.1, width * 0.9, height * 0.4], fill=(20, 20, 160))
    draw.text((width * 0.1, height * 0.05), "Token 2024", fill=(255, 255, 255))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def normalised(cfg: EncoderConfig, image: Image.Image) -> torch.Tensor:
    """prepare + normalise: what the encoder feeds its tower, as float32 [T, 3, H, W]."""
    return normalize_pixels(torch.from_numpy(prepare_image(image, cfg).tiles), cfg.image_mean, cfg.image_std)


def hf_hidden_states(encoder: VisionEncoder, image: Image.Image) -> tuple[torch.Tensor, ...]:
    pixels = normalised(encoder.cfg, image)
    with torch.inference_mode():
        return encoder.tower(pixels, output_hidden_states=True).hidden_states


# --------------------------------------------------------------------------------------------- token counts


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_plain_and_anyres_token_counts(family, clip_encoder, siglip_encoder):
    encoder = clip_encoder if family == "clip" else siglip_encoder
    side = encoder.cfg.image_size // encoder.cfg.patch_size
    assert encoder.side == side and encoder.tokens_per_tile == side * side
    images = [photo_like(500, 300), photo_like(900, 200, seed=1), photo_like(60, 60, seed=2)]

    plain = encoder.encode_images(images)
    for encoded in plain:
        assert encoded.tokens.shape == (side * side, encoder.hidden_size) and encoded.tokens.dtype == torch.float32
        assert encoded.grid == (0, 0) and encoded.side == side
        assert torch.equal(encoded.positions, torch.arange(side * side))

    anyres = VisionEncoder(encoder.tower, dataclasses.replace(encoder.cfg, anyres=True))
    # 5:3 keeps most pixels on the 2x2 pinpoint, 9:2 on the 1x3 strip; a small square keeps all its pixels on
    # every pinpoint, so the one that wastes least (1x2, first in list order) wins.
    expected_grids = [(2, 2), (1, 3), (1, 2)]
    encoded = anyres.encode_images(images)
    for item, grid in zip(encoded, expected_grids):
        n = (1 + grid[0] * grid[1]) * side * side
        assert item.grid == grid and item.tokens.shape == (n, encoder.hidden_size)
        assert torch.equal(item.positions, torch.arange(n))
    # Tile 0 is the squashed whole image: the same tokens a plain squash encoder gives.
    squash = VisionEncoder(encoder.tower, dataclasses.replace(encoder.cfg, resize_mode="squash"))
    torch.testing.assert_close(encoded[0].tokens[: side * side], squash.encode_images(images[:1])[0].tokens)


def test_batching_does_not_change_tokens(siglip_encoder):
    images = [photo_like(320, 240, seed=s) for s in range(3)]
    together = siglip_encoder.encode_images(images)  # 3 tiles in one micro-batch of 4
    anyres = VisionEncoder(siglip_encoder.tower, dataclasses.replace(SIGLIP_TINY, anyres=True, batch_size=3))
    split = anyres.encode_images(images)  # 15 tiles over micro-batches of 3, crossing image boundaries
    for image, encoded in zip(images, together):
        alone = siglip_encoder.encode_images([image])[0].tokens
        torch.testing.assert_close(encoded.tokens, alone, atol=1e-5, rtol=1e-5)
    for image, encoded in zip(images, split):
        torch.testing.assert_close(encoded.tokens, anyres.encode_images([image])[0].tokens, atol=1e-5, rtol=1e-5)


def test_tokens_are_ordinary_tensors_for_training(clip_encoder):
    tokens = clip_encoder.encode_images([photo_like(64, 48)])[0].tokens
    assert not tokens.is_inference()
    probe = torch.nn.Linear(tokens.shape[1], 1)
    probe(tokens).sum().backward()
    assert probe.weight.grad is not None


# --------------------------------------------------------------------------------------------- layers


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_select_layer_matches_hidden_states(family, clip_encoder, siglip_encoder):
    encoder = clip_encoder if family == "clip" else siglip_encoder
    image = photo_like(200, 150)
    hidden = hf_hidden_states(encoder, image)
    first = 1 if family == "clip" else 0  # CLIP's CLS token is dropped
    features = {}
    for layer in (-1, -2, 1):
        chosen = VisionEncoder(encoder.tower, dataclasses.replace(encoder.cfg, select_layer=layer))
        features[layer] = chosen.encode_images([image])[0].tokens
        torch.testing.assert_close(features[layer], hidden[layer][0, first:], atol=1e-5, rtol=1e-5)
    assert (features[-1] - features[-2]).abs().max() > 1e-2


def test_select_layer_out_of_range_is_a_config_error(clip_encoder):
    with pytest.raises(ConfigError, match="select_layer"):
        VisionEncoder(clip_encoder.tower, dataclasses.replace(CLIP_TINY, select_layer=-8))


def test_a_cuda_device_this_process_does_not_see_is_a_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ConfigError, match=r"encoder.device=cuda:1: this process sees 1 CUDA devices"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ConfigError, match=r"encoder.device=cuda: .* use auto or cpu"):
        resolve_device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


def test_cls_attention_matches_eager_attention(clip_encoder):
    image = photo_like(240, 180)
    encoded = clip_encoder.encode_images([image], with_cls_attention=True)[0]
    eager = copy.deepcopy(clip_encoder.tower)
    eager.set_attn_implementation("eager")
    with torch.inference_mode():
        attentions = eager(normalised(CLIP_TINY, image), output_attentions=True).attentions
    expected = attentions[-1][0, :, 0, 1:].mean(dim=0)
    torch.testing.assert_close(encoded.cls_attention, expected, atol=1e-5, rtol=1e-4)
    # select_layer=-1 runs the last layer too; the attention is the same.
    last = VisionEncoder(clip_encoder.tower, dataclasses.replace(CLIP_TINY, select_layer=-1))
    from_last = last.encode_images([image], with_cls_attention=True)[0].cls_attention
    torch.testing.assert_close(from_last, expected, atol=1e-5, rtol=1e-4)
    assert clip_encoder.encode_images([image])[0].cls_attention is None


def test_cls_attention_needs_clip(siglip_encoder):
    with pytest.raises(ConfigError, match="family=clip"):
        siglip_encoder.encode_images([photo_like(64, 64)], with_cls_attention=True)


# --------------------------------------------------------------------------------------------- weights


def test_seeded_init_is_deterministic_and_leaves_global_rng_alone(clip_encoder):
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    again = VisionEncoder.from_config(CLIP_TINY)
    assert torch.equal(torch.rand(3), expected_draw)
    assert again.fingerprint() == clip_encoder.fingerprint()
    for (name, a), (_, b) in zip(again.tower.state_dict().items(), clip_encoder.tower.state_dict().items()):
        assert torch.equal(a, b), name
    other = VisionEncoder.from_config(dataclasses.replace(CLIP_TINY, seed=1))
    assert other.fingerprint() != clip_encoder.fingerprint()


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_save_pretrained_round_trip(family, tmp_path, clip_encoder, siglip_encoder):
    encoder = clip_encoder if family == "clip" else siglip_encoder
    encoder.tower.save_pretrained(tmp_path)
    cfg = dataclasses.replace(encoder.cfg, pretrained=str(tmp_path), local_files_only=True)
    loaded = VisionEncoder.from_config(cfg)
    assert loaded.fingerprint() == encoder.fingerprint()
    images = [photo_like(300, 200)]
    assert torch.equal(loaded.encode_images(images)[0].tokens, encoder.encode_images(images)[0].tokens)


def test_loads_vision_tower_from_a_full_clip_checkpoint(tmp_path):
    """Hub checkpoints (openai/clip-vit-large-patch14-336) hold text and vision towers; only vision loads."""
    vision = dict(
        image_size=64, patch_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    full = CLIPModel(CLIPConfig(vision_config=vision, text_config=text))
    full.save_pretrained(tmp_path)
    cfg = EncoderConfig(pretrained=str(tmp_path), local_files_only=True, image_size=64, patch_size=16, hidden_size=32,
                        num_layers=2, num_heads=2, intermediate_size=64, device="cpu")
    assert VisionEncoder.from_config(cfg).fingerprint() == weights_fingerprint(full.vision_model)
    with pytest.raises(ConfigError, match="encoder.hidden_size=48"):
        VisionEncoder.from_config(dataclasses.replace(cfg, hidden_size=48))


def test_compile_failure_falls_back_to_eager(monkeypatch, caplog, clip_encoder):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no compiler here")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    compiled = VisionEncoder(clip_encoder.tower, dataclasses.replace(CLIP_TINY, compile=True))
    images = [photo_like(300, 200, seed=s) for s in range(5)]
    with caplog.at_level(logging.WARNING, logger="pipeline.encoders.tower"):
        encoded = compiled.encode_images(images)
    assert "running eagerly" in caplog.text and "no compiler here" in caplog.text
    for got, want in zip(encoded, clip_encoder.encode_images(images)):
        torch.testing.assert_close(got.tokens, want.tokens, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------- preprocessing


def expand2square(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """LLaVA's letterbox for image_aspect_ratio="pad", written out as LLaVA has it."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), fill)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


@pytest.mark.parametrize("size", [(317, 211), (211, 317)])
def test_preprocessing_matches_hf_processors(size):
    image = photo_like(*size)
    s = CLIP_TINY.image_size
    clip = CLIPImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s})
    expected = clip(images=image, return_tensors="np")["pixel_values"]
    assert np.abs(normalised(CLIP_TINY, image).numpy() - expected).max() < PROCESSOR_TOLERANCE

    fill = tuple(int(m * 255) for m in CLIP_TINY.image_mean)
    expected = clip(images=expand2square(image, fill), return_tensors="np")["pixel_values"]
    padded = normalised(dataclasses.replace(CLIP_TINY, resize_mode="pad"), image).numpy()
    assert np.abs(padded - expected).max() < PROCESSOR_TOLERANCE

    s = SIGLIP_TINY.image_size
    siglip = SiglipImageProcessorPil(size={"height": s, "width": s}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    expected = siglip(images=image, return_tensors="np")["pixel_values"]
    assert np.abs(normalised(SIGLIP_TINY, image).numpy() - expected).max() < PROCESSOR_TOLERANCE

    s = CLIP_TINY.image_size
    anyres = dataclasses.replace(CLIP_TINY, anyres=True)
    llava_next = LlavaNextImageProcessorPil(
        size={"shortest_edge": s}, crop_size={"height": s, "width": s}, image_grid_pinpoints=anyres.image_grid_pinpoints
    )
    expected = llava_next(images=image, return_tensors="np")["pixel_values"][0]
    got = normalised(anyres, image).numpy()
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < PROCESSOR_TOLERANCE


# --------------------------------------------------------------------------------------------- token boxes


def test_token_boxes_start_at_the_centre_crop():
    # 300x200 -> short side 224: 336x224, crop 56 px off the left, i.e. 50 original pixels.
    boxes = token_boxes((300, 200), (0, 0), CLIP_TINY)
    side, step = 14, 16 * 300 / 336
    assert boxes.shape == (side * side, 4)
    np.testing.assert_allclose(boxes[:side, 0], 50 + step * np.arange(side))
    np.testing.assert_allclose(boxes[:side, 1], 0.0)
    np.testing.assert_allclose(boxes[side - 1, 2], 250.0)
    np.testing.assert_allclose(boxes[-1, 3], 200.0)
    portrait = token_boxes((200, 300), (0, 0), CLIP_TINY)
    np.testing.assert_allclose(portrait[0], [0, 50, 16 * 200 / 224, 50 + step])


def test_token_boxes_in_padding_are_empty():
    cfg = dataclasses.replace(CLIP_TINY, resize_mode="pad")
    boxes = token_boxes((448, 224), (0, 0), cfg)  # letterbox: rows 0-3 and 11-13 of 14 are mean-colour padding
    heights = (boxes[:, 3] - boxes[:, 1]).reshape(14, 14)
    assert (heights[:3] == 0).all() and (heights[-3:] == 0).all() and (heights[4:10] > 0).all()


@pytest.mark.parametrize(
    "cfg",
    [
        CLIP_TINY,
        dataclasses.replace(CLIP_TINY, resize_mode="squash"),
        dataclasses.replace(CLIP_TINY, resize_mode="pad"),
        dataclasses.replace(CLIP_TINY, anyres=True),
        SIGLIP_TINY,
        dataclasses.replace(SIGLIP_TINY, anyres=True),
    ],
    ids=["crop", "squash", "pad", "anyres", "siglip", "siglip-anyres"],
)
@pytest.mark.parametrize("size", [(300, 180), (180, 300)])
def test_token_boxes_locate_what_each_token_sees(cfg, size):
    """A red rectangle on grey: tokens whose box lies inside it see red pixels, tokens whose box misses it don't."""
    width, height = size
    x0, y0, x1, y1 = int(width * 0.45), int(height * 0.2), int(width * 0.9), int(height * 0.8)
    pixels = np.full((height, width, 3), 128, np.uint8)
    pixels[y0:y1, x0:x1] = (255, 0, 0)
    prepared = prepare_image(Image.fromarray(pixels), cfg)
    boxes = token_boxes(size, prepared.grid, cfg)

    side, patch = cfg.image_size // cfg.patch_size, cfg.patch_size
    used = prepared.tiles[:, : side * patch, : side * patch].astype(np.int32)
    patches = used.reshape(-1, side, patch, side, patch, 3).transpose(0, 1, 3, 2, 4, 5).reshape(-1, patch, patch, 3)
    redness = (patches[..., 0] - patches[..., 1]).mean(axis=(1, 2))
    assert len(boxes) == len(redness)

    margin = 4
    bx0, by0, bx1, by1 = boxes.T
    inside = (bx0 >= x0 + margin) & (bx1 <= x1 - margin) & (by0 >= y0 + margin) & (by1 <= y1 - margin)
    apart = (bx1 <= x0 - margin) | (bx0 >= x1 + margin) | (by1 <= y0 - margin) | (by0 >= y1 + margin)
    assert inside.sum() >= 4 and apart.sum() >= 4
    assert (redness[inside] > 200).all()
    assert (redness[apart] < 30).all()


# --------------------------------------------------------------------------------------------- presets


@pytest.mark.parametrize(
    ("preset", "plain", "anyres_max"),
    [("tiny", 196, 980), ("vit-b-16", 196, 980), ("clip-vit-l-336", 576, 2880), ("siglip-so400m", 729, 3645)],
)
def test_presets_load_with_their_token_counts(preset, plain, anyres_max):
    cfg = load_config(CompressConfig, overrides=[f"encoder={preset}", "encoder.pretrained=null"]).encoder
    assert cfg.name == preset and cfg.tokens_per_tile == plain
    assert dataclasses.replace(cfg, anyres=False).max_tiles == 1
    assert dataclasses.replace(cfg, anyres=True).max_tiles * cfg.tokens_per_tile == anyres_max
