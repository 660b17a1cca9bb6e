"""The GPU path on a CPU machine: the torch preprocessing against the HF processors, which JPEGs go to nvJPEG,
the nvJPEG path (through a stand-in decoder) with its CPU fallbacks, clean fallback when no GPU is there, and
the kept tokens' way back to the host."""

from __future__ import annotations

import dataclasses
import io
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    CLIPImageProcessorPil,
    LlavaNextImageProcessorPil,
    SiglipImageProcessorPil,
)

from pipeline.compress.run import run_compress
from pipeline.config import CompressConfig, DecodeConfig, EncoderConfig, load_config
from pipeline.encoders import normalize_pixels, prepare_image
from pipeline.encoders.gpu_preprocess import (
    pil_height_first_rule,
    prepare_images,
    resize_like_pil,
)
from pipeline.sources import list_shards
from pipeline.stages import gpu_decode, kept_tokens
from pipeline.stages.decode import decode_shard
from pipeline.stages.encode_select import EncodeSelectStage
from pipeline.stages.gpu_decode import (
    decode_jpegs,
    gpu_decode_requested,
    jpeg_size_for_gpu,
    load_nvjpeg,
)
from pipeline.stages.kept_tokens import gather_kept, per_image
from tests.test_compress import stored_rows
from tests.test_encoders import CLIP_TINY, SIGLIP_TINY, expand2square, photo_like

# The torch resize against PIL's, measured on the photos below and on random sizes: at most one uint8 level,
# on at most 0.03% of the values (float arithmetic where PIL uses 22-bit fixed point). The tests allow one
# level on 0.1% of the values; after normalisation one level is 1 / 255 / std.
ONE_LEVEL = 1 / 255 / min(CLIP_TINY.image_std) + 1e-6
DIFFERING_AT_MOST = 1e-3


def real_photos() -> list[Image.Image]:
    """matplotlib's sample photo (a real JPEG, 512x600) at the sizes that exercise each resize path."""
    matplotlib = pytest.importorskip("matplotlib")
    photo = Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")
    return [
        photo,  # portrait, downscaled
        photo.crop((100, 0, 250, 600)),  # tall and narrow: Pillow 13 resizes it vertically first when squashing
        photo.resize((900, 300)),  # wide
        photo.crop((200, 200, 300, 280)),  # small: upscaled
    ]


def tensor_of(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def torch_normalised(images: list[Image.Image], cfg: EncoderConfig) -> list[np.ndarray]:
    prepared = prepare_images([tensor_of(image) for image in images], cfg)
    return [normalize_pixels(tiles, cfg.image_mean, cfg.image_std).numpy() for tiles, _ in prepared]


def assert_within_one_level(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.shape == expected.shape
    difference = np.abs(got - expected)
    assert difference.max() <= ONE_LEVEL
    assert (difference > 1e-6).mean() <= DIFFERING_AT_MOST


@pytest.mark.parametrize("mode", ["clip", "pad", "siglip", "llava-next"])
def test_torch_preprocessing_matches_the_hf_processors_on_real_photos(mode):
    photos = real_photos()
    if mode == "clip":
        cfg = CLIP_TINY
        s = cfg.image_size
        processor = CLIPImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s})
        inputs = photos
    elif mode == "pad":
        cfg = dataclasses.replace(CLIP_TINY, resize_mode="pad")
        s = cfg.image_size
        processor = CLIPImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s})
        fill = tuple(int(m * 255) for m in cfg.image_mean)
        inputs = [expand2square(photo, fill) for photo in photos]
    elif mode == "siglip":
        cfg = SIGLIP_TINY
        s = cfg.image_size
        processor = SiglipImageProcessorPil(size={"height": s, "width": s}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
        inputs = photos
    else:
        cfg = dataclasses.replace(CLIP_TINY, anyres=True)
        s = cfg.image_size
        processor = LlavaNextImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s},
                                               image_grid_pinpoints=cfg.image_grid_pinpoints)
        inputs = photos
    for photo, processor_input, got in zip(photos, inputs, torch_normalised(photos, cfg)):
        expected = processor(images=processor_input, return_tensors="np")["pixel_values"]
        assert_within_one_level(got, expected[0] if mode == "llava-next" else expected)


def test_torch_resize_matches_pil_at_random_sizes_and_grids_match():
    rng = np.random.default_rng(1)
    photo = real_photos()[0]
    for _ in range(12):
        source = photo.resize(tuple(int(v) for v in rng.integers(40, 400, 2)))
        size = tuple(int(v) for v in rng.integers(30, 300, 2))
        expected = np.asarray(source.resize(size, Image.Resampling.BICUBIC)).astype(int)
        got = resize_like_pil(tensor_of(source)[None], size)[0].permute(1, 2, 0).numpy().astype(int)
        assert np.abs(got - expected).max() <= 1 and (got != expected).mean() <= DIFFERING_AT_MOST
    anyres = dataclasses.replace(CLIP_TINY, anyres=True)
    for photo in real_photos():
        tiles, grid = prepare_images([tensor_of(photo)], anyres)[0]
        reference = prepare_image(photo, anyres)
        assert grid == reference.grid and tuple(tiles.shape) == reference.tiles.shape
    assert isinstance(pil_height_first_rule(), bool)


# --------------------------------------------------------------------------------------------- which JPEGs


def encoded(image: Image.Image, format: str = "JPEG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **kwargs)
    return buffer.getvalue()


def rotated_jpeg(image: Image.Image) -> bytes:
    exif = image.getexif()
    exif[0x0112] = 6
    return encoded(image, exif=exif)


def header_only_jpeg(image: Image.Image) -> bytes:
    """A JPEG whose header (size, mode, EOI) is fine but which has no scan data: no decoder can read it."""
    data = encoded(image)
    return data[: data.index(b"\xff\xda")] + b"\xff\xd9"


def test_only_plain_complete_jpegs_go_to_the_gpu():
    photo = photo_like(160, 120)
    cfg = DecodeConfig()
    assert jpeg_size_for_gpu(encoded(photo), cfg) == (160, 120)
    assert jpeg_size_for_gpu(encoded(photo, progressive=True), cfg) == (160, 120)
    assert jpeg_size_for_gpu(encoded(photo) + bytes(10), cfg) == (160, 120)  # zero padding after EOI
    not_for_gpu = {
        "png": encoded(photo, "PNG"),
        "cmyk": encoded(photo.convert("CMYK")),
        "grayscale": encoded(photo.convert("L")),
        "exif rotated": rotated_jpeg(photo),
        "truncated": encoded(photo)[:400],
        "empty": b"",
        "not an image": b"\xff\xd8 but nothing else \xff\xd9",
    }
    for name, data in not_for_gpu.items():
        assert jpeg_size_for_gpu(data, cfg) is None, name
    assert jpeg_size_for_gpu(encoded(photo), dataclasses.replace(cfg, max_pixels=100)) is None
    assert jpeg_size_for_gpu(encoded(photo), dataclasses.replace(cfg, max_bytes=100)) is None


def test_decode_device_auto_follows_the_encoders_device(monkeypatch):
    def cfg(*overrides: str) -> CompressConfig:
        return load_config(CompressConfig, None, list(overrides))

    monkeypatch.setattr(gpu_decode, "torchvision_installed", lambda: True)
    assert gpu_decode_requested(cfg("decode.device=cuda"))
    assert not gpu_decode_requested(cfg("decode.device=cpu", "executor=local"))
    assert gpu_decode_requested(cfg("executor=local")) == torch.cuda.is_available()
    assert not gpu_decode_requested(cfg("executor=local", "encoder.device=cpu"))
    assert gpu_decode_requested(cfg("executor=ray", "ray.num_gpus_per_actor=1"))
    assert not gpu_decode_requested(cfg("executor=ray", "ray.num_gpus_per_actor=0"))
    monkeypatch.setattr(gpu_decode, "torchvision_installed", lambda: False)
    assert not gpu_decode_requested(cfg("executor=ray", "ray.num_gpus_per_actor=1"))  # auto needs torchvision
    assert gpu_decode_requested(cfg("executor=ray", "ray.num_gpus_per_actor=1", "decode.device=cuda"))
    decoder, why_not = load_nvjpeg(torch.device("cpu"))
    assert decoder is None and "not a CUDA device" in why_not
    if not torch.cuda.is_available():  # without torchvision, or with it but no GPU to decode on
        decoder, why_not = load_nvjpeg(torch.device("cuda"))
        assert decoder is None and ("torchvision" in why_not or "nvJPEG" in why_not)


# --------------------------------------------------------------------------------------------- the stage


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def mixed_shard(tmp_path_factory) -> Path:
    """JPEGs for nvJPEG, one nothing can decode, and images only the CPU path takes (PNG, rotated, CMYK)."""
    photo = real_photos()[0]
    members = [
        ("photo.jpg", encoded(photo)), ("photo.txt", b"a real photo"),
        ("wide.jpg", encoded(photo_like(300, 200, seed=1))),
        ("tall.jpg", encoded(photo_like(120, 260, seed=2))),
        ("broken.jpg", header_only_jpeg(photo_like(64, 48))),
        ("drawing.png", encoded(photo_like(90, 70, seed=3), "PNG")),
        ("rotated.jpg", rotated_jpeg(photo_like(80, 60, seed=4))),
        ("cmyk.jpg", encoded(photo_like(70, 50, seed=5).convert("CMYK"))),
    ]
    return write_tar(tmp_path_factory.mktemp("mixed") / "in" / "mixed.tar", members).parent


def config(input_path, output_path, *overrides: str) -> CompressConfig:
    return load_config(CompressConfig, None, [
        f"input.path={input_path}", f"output.path={output_path}", "executor=local", "encoder.batch_size=8",
        "encoder.device=cpu", "selector.method=norm", "selector.mode=ratio", "selector.ratio=0.5", *overrides])


class StandInNvJpeg:
    """nvJPEG's contract on the CPU: a batch decodes completely or raises (RuntimeError), no partial results."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, encoded_images: list[torch.Tensor]) -> list[torch.Tensor]:
        self.calls.append(len(encoded_images))
        images = []
        for data in encoded_images:
            try:
                image = Image.open(io.BytesIO(data.numpy().tobytes()))
                image.load()
            except Exception as exc:
                raise RuntimeError(f"Error while decoding JPEG images: {exc}") from None
            images.append(tensor_of(image.convert("RGB")))
        return images


def test_nvjpeg_path_falls_back_per_image_and_quarantines_what_nothing_decodes(mixed_shard, tmp_path):
    cfg = config(mixed_shard, tmp_path / "out", "decode.device=cuda")
    shard = list_shards(cfg.input, {})[0]
    rows = {row["key"]: row for row in decode_shard(shard, cfg) if row["kind"] == "sample"}
    for key in ("photo", "wide", "tall", "broken"):
        assert rows[key]["image"] is not None and rows[key]["pixels"] is None, key
    for key in ("drawing", "rotated", "cmyk"):
        assert rows[key]["image"] is None and rows[key]["pixels"] is not None, key
    assert (rows["rotated"]["width"], rows["rotated"]["height"]) == (60, 80)  # transposed on the CPU

    stage = EncodeSelectStage(cfg)
    stage.jpeg_decoder = nvjpeg = StandInNvJpeg()
    batch = list(rows.values())
    staged = stage.stage(batch)
    assert nvjpeg.calls == [4, 1, 1, 1, 1]  # the batch failed on "broken", then one by one
    assert rows["broken"]["kind"] == "quarantine" and rows["broken"]["reason"].startswith("corrupt")
    assert [r["key"] for r in staged.samples] == ["photo", "wide", "tall", "drawing", "rotated", "cmyk"]
    offsets = np.cumsum([0, *staged.tile_counts])
    for i, row in enumerate(staged.samples):
        cpu_tiles = stage_tiles_on_cpu(batch, row["key"], cfg)
        got = staged.tiles[offsets[i] : offsets[i + 1]].numpy().astype(int)
        assert np.abs(got - cpu_tiles).max() <= 1 and (got != cpu_tiles).mean() <= DIFFERING_AT_MOST
    kept = stage.gather(stage.encode_and_select(staged))
    encoded = stage.encoded_table(staged, kept).to_pylist()
    assert sorted(row["key"] for row in encoded if row["kind"] == "sample") == sorted(r["key"] for r in staged.samples)
    for row in encoded:
        if row["kind"] == "sample":
            assert row["n_kept"] == row["n_tokens"] // 2 and len(row["tokens"]) == row["n_kept"] * 192 * 2


def stage_tiles_on_cpu(rows: list[dict], key: str, cfg: CompressConfig) -> np.ndarray:
    shard = list_shards(cfg.input, {})[0]
    cpu = dataclasses.replace(cfg, decode=dataclasses.replace(cfg.decode, device="cpu"))
    row = next(r for r in decode_shard(shard, cpu) if r["key"] == key)
    size = cfg.encoder.image_size
    return np.frombuffer(row["pixels"], dtype=np.uint8).reshape(-1, size, size, 3).astype(int)


def test_decode_jpegs_refuses_an_image_of_the_wrong_size():
    jpeg = encoded(photo_like(40, 30))
    assert decode_jpegs([jpeg], [(40, 30)], StandInNvJpeg())[0].shape == (3, 30, 40)
    assert decode_jpegs([jpeg], [(41, 30)], StandInNvJpeg()) == [None]


def test_cuda_decode_without_a_gpu_falls_back_to_the_cpu_with_a_note(mixed_shard, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.stages.encode_select"):
        on_cuda = run_compress(config(mixed_shard, tmp_path / "a", "decode.device=cuda"))
    assert "decode.device=cuda" in caplog.text and "decoding JPEGs on the CPU instead" in caplog.text
    on_cpu = run_compress(config(mixed_shard, tmp_path / "b", "decode.device=cpu"))
    assert on_cuda["cfg_hash"] == on_cpu["cfg_hash"]
    assert on_cuda["images"] == on_cpu["images"] == 6 and on_cuda["quarantined"] == on_cpu["quarantined"] == 1
    assert rows_by_key(on_cuda["output"]) == rows_by_key(on_cpu["output"])


def rows_by_key(output: str) -> dict[str, dict]:
    return {row["key"]: {k: v for k, v in row.items() if k != "source_shard"} for row in stored_rows(output)}


def test_ray_actor_without_nvjpeg_decodes_the_jpeg_bytes_on_the_cpu(mixed_shard, tmp_path, ray_cluster):
    """decode.device=cuda under Ray: the JPEG bytes reach the actor as Arrow rows, it decodes them on the CPU,
    and the stored rows equal the local executor's."""
    distributed = run_compress(config(mixed_shard, tmp_path / "ray", "decode.device=cuda", "executor=ray"))
    local = run_compress(config(mixed_shard, tmp_path / "local", "decode.device=cpu"))
    assert distributed["images"] == 6 and distributed["quarantined"] == 1
    assert rows_by_key(distributed["output"]) == rows_by_key(local["output"])


# --------------------------------------------------------------------------------------------- kept tokens


def test_kept_tokens_come_back_per_image_in_the_stored_dtype_in_arrow_chunks(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    tile_counts, tokens_per_tile, dim = [1, 3, 2], 4, 8
    per_tile = torch.randn(sum(tile_counts), tokens_per_tile, dim, generator=generator)
    tokens, mask = per_image(per_tile, tile_counts)
    assert tokens.shape == (3, 12, dim) and mask.sum(1).tolist() == [4, 12, 8]
    assert torch.equal(tokens[1, :12], per_tile[1:4].reshape(12, dim)) and not tokens[0, 4:].any()
    scores = torch.rand(mask.shape, generator=generator).masked_fill(~mask, float("-inf"))
    keep = mask & (scores > 0.4)

    monkeypatch.setattr(kept_tokens, "MAX_BINARY_BYTES", 5 * dim * 2)  # at most 5 float16 tokens per chunk
    kept = gather_kept(tokens, scores, keep, "float16", with_scores=True)
    chunks = list(kept.arrow_columns())
    assert len(chunks) > 1 and chunks[-1][0].stop == 3
    for images, columns in chunks:
        for i, image in enumerate(range(3)[images]):
            positions = keep[image].nonzero()[:, 0]
            assert columns["n_kept"][i].as_py() == len(positions)
            assert np.frombuffer(columns["positions"][i].as_py(), "<i4").tolist() == positions.tolist()
            stored = np.frombuffer(columns["tokens"][i].as_py(), "<f2").reshape(-1, dim)
            assert np.array_equal(stored, tokens[image, positions].half().numpy())
            assert np.array_equal(np.frombuffer(columns["scores"][i].as_py(), "<f2"),
                                  scores[image, positions].half().numpy())
