import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pipeline.config import ConfigError, CorpusConfig
from pipeline.corpus import (
    generate_sample,
    text_patch_density,
    text_patch_mask,
    write_corpus,
)

REPO = Path(__file__).resolve().parent.parent


def shard_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob("*/shard-*.tar"))}


def read_samples(root: Path) -> dict[str, dict]:
    """Every sample of every shard, grouped by key, via webdataset's own reader."""
    urls = [str(p) for p in sorted(root.glob("*/shard-*.tar"))]
    return {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, CorpusConfig, dict]:
    root = tmp_path_factory.mktemp("corpus")
    cfg = CorpusConfig(output=str(root), n=40, shard_size=8, heldout_fraction=0.25, image_size=224, seed=3)
    return root, cfg, write_corpus(cfg)


def test_same_seed_gives_identical_bytes_and_another_seed_differs(corpus, tmp_path):
    root, cfg, _ = corpus
    again = CorpusConfig(**{**vars(cfg), "output": str(tmp_path / "again")})
    write_corpus(again)
    assert shard_bytes(tmp_path / "again") == shard_bytes(root)
    other = CorpusConfig(**{**vars(cfg), "output": str(tmp_path / "other"), "seed": 4})
    write_corpus(other)
    assert shard_bytes(tmp_path / "other").keys() == shard_bytes(root).keys()
    assert shard_bytes(tmp_path / "other") != shard_bytes(root)


def test_layout_splits_and_families(corpus):
    root, cfg, summary = corpus
    assert [p.name for p in sorted((root / "train").glob("*.tar"))] == [f"shard-{i:05d}.tar" for i in range(4)]
    assert [p.name for p in sorted((root / "heldout").glob("*.tar"))] == ["shard-00000.tar", "shard-00001.tar"]
    assert summary["samples"] == {"train": 30, "heldout": 10, "document": 20, "natural": 20}
    heldout = {s["__key__"] for s in wds.WebDataset(str(root / "heldout" / "shard-00000.tar"), shardshuffle=False)}
    assert any(k.startswith("doc-") for k in heldout) and any(k.startswith("nat-") for k in heldout)


def test_every_member_is_present_and_valid(corpus):
    root, cfg, _ = corpus
    names = []
    for path in sorted(root.glob("*/shard-*.tar")):
        with tarfile.open(path) as tar:
            names += tar.getnames()
            assert all(m.mtime == 0 and m.uid == 0 for m in tar.getmembers())
    assert len(names) == len(set(names)) == 3 * cfg.n
    samples = read_samples(root)
    assert len(samples) == cfg.n
    formats = {"jpg": 0, "png": 0}
    for key, sample in samples.items():
        image_ext = "jpg" if "jpg" in sample else "png"
        formats[image_ext] += 1
        meta = json.loads(sample["json"])
        assert sample["txt"].decode() == meta["caption"]
        assert key.startswith({"document": "doc-", "natural": "nat-"}[meta["family"]])
        image = Image.open(io.BytesIO(sample[image_ext]))
        image.load()
        width, height = image.size
        assert 0.75 * cfg.image_size - 1 <= min(width, height) and max(width, height) <= 1.5 * cfg.image_size
        for x0, y0, x1, y1 in meta["text_boxes"]:
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        if meta["family"] == "natural":
            assert meta["text_boxes"] == [] and meta["density"] == 0.0 and not meta["has_digits"]
            assert meta["caption"].startswith("a natural scene")
        else:
            assert meta["text_boxes"] and meta["words"] and meta["caption"].startswith("a ")
            assert meta["density"] == pytest.approx(text_patch_density(meta["text_boxes"], image.size), abs=1e-4)
    assert formats["jpg"] > formats["png"] > 0


def test_text_boxes_cover_the_ink():
    sample = generate_sample(7, "document", seed=0)
    pixels = np.asarray(sample.image).astype(int)
    ink = np.abs(pixels - pixels[0, 0]).sum(-1) > 60
    covered = np.zeros_like(ink)
    for x0, y0, x1, y1 in sample.meta["text_boxes"]:
        assert ink[y0:y1, x0:x1].any()
        covered[y0:y1, x0:x1] = True
    # Table rules are the only ink left outside the boxes.
    assert (ink & covered).sum() > 0.6 * ink.sum()


def test_document_density_matches_real_pages():
    densities = np.array([generate_sample(i, "document", seed=0).meta["density"] for i in range(64)])
    assert 0.45 < densities.mean() < 0.8
    assert np.percentile(densities, 90) > 0.7
    assert ((0.3 < densities) & (densities < 0.6)).sum() >= 5
    assert (densities < 0.2).any()


def test_density_uses_clips_centre_crop():
    # A 224x448 portrait page: the crop keeps rows 112..336, so a box in the top quarter is invisible.
    assert text_patch_density([[0, 0, 224, 100]], (224, 448)) == 0.0
    mask = text_patch_mask([[0, 112, 16, 128]], (224, 448))
    assert mask.sum() == 1 and mask[0, 0]
    assert text_patch_density([[0, 0, 448, 896]], (448, 896)) == 1.0


def test_bad_settings_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="heldout_fraction"):
        write_corpus(CorpusConfig(output=str(tmp_path), n=4, heldout_fraction=1.0))


def test_rerun_with_fewer_samples_removes_stale_shards(tmp_path):
    write_corpus(CorpusConfig(output=str(tmp_path), n=12, shard_size=2, image_size=96))
    write_corpus(CorpusConfig(output=str(tmp_path), n=4, shard_size=2, image_size=96))
    assert len(read_samples(tmp_path)) == 4


def run_job(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.make_corpus", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cli_writes_corpus_and_prints_summary(tmp_path):
    result = run_job(f"output={tmp_path}", "n=8", "image_size=128")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["status"] == "ok" and summary["samples"]["train"] + summary["samples"]["heldout"] == 8
    assert len(read_samples(tmp_path)) == 8


def test_cli_rejects_unknown_key():
    result = run_job("nn=3")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "nn" in result.stderr


def test_code_pages_carry_one_grid_aligned_tag_whose_digit_is_the_label():
    from pipeline.corpus import CODE_TAG, generate_code_page

    pages = [generate_code_page(i, seed=0) for i in range(24)]
    again = generate_code_page(3, seed=0)
    assert again.image.tobytes() == pages[3].image.tobytes() and again.meta == pages[3].meta
    assert {p.meta["code"] for p in pages} == {0, 1, 2, 3}
    for page in pages:
        row, col = page.meta["code_cell"]
        tag = [col * CODE_TAG, row * CODE_TAG, (col + 1) * CODE_TAG, (row + 1) * CODE_TAG]
        assert tag in page.meta["text_boxes"]  # the oracle counts the tag as text
        pixels = np.asarray(page.image)[tag[1] : tag[3], tag[0] : tag[2]]
        assert (pixels.min(-1) > 200).any()  # the white digit on the coloured tag
        # Sparse: the oracle keeps every text patch, the tag among them, within 30% of the tokens.
        assert page.meta["density"] < 0.3
