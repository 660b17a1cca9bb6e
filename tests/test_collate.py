import pytest
import torch

from pipeline.loader.collate import TokenBudgetBatcher, pack_collate, pack_samples, pad_collate

DIM = 3


def _samples(lengths):
    return [
        {
            "key": f"k{i}",
            "tokens": torch.randn(n, DIM) + 1.0,  # never zero, so padding is distinguishable
            "positions": torch.arange(n, dtype=torch.int64) * 2 + i,
            "n_tokens": 16,
            "grid": (i, i + 1),
            "side": 4,
            "caption": f"caption {i}",
        }
        for i, n in enumerate(lengths)
    ]


def test_pad_collate_keeps_every_token_and_masks_the_padding():
    samples = _samples([3, 0, 5, 1])
    batch = pad_collate(samples)
    assert batch["tokens"].shape == (4, 5, DIM) and batch["tokens"].dtype == torch.float32
    assert batch["lengths"].tolist() == [3, 0, 5, 1]
    assert batch["attention_mask"].sum(1).tolist() == [3, 0, 5, 1]
    for i, sample in enumerate(samples):
        n = len(sample["tokens"])
        assert batch["attention_mask"][i, :n].all() and not batch["attention_mask"][i, n:].any()
        assert torch.equal(batch["tokens"][i, :n], sample["tokens"])
        assert torch.equal(batch["positions"][i, :n], sample["positions"])
        assert (batch["tokens"][i, n:] == 0).all() and (batch["positions"][i, n:] == -1).all()
    assert batch["keys"] == ["k0", "k1", "k2", "k3"]
    assert batch["grid"].tolist() == [[0, 1], [1, 2], [2, 3], [3, 4]]
    assert batch["n_tokens"].tolist() == [16] * 4 and batch["side"] == 4
    assert batch["caption"] == [f"caption {i}" for i in range(4)]


def test_pack_collate_boundaries_recover_each_sample():
    samples = _samples([2, 4, 0, 3])
    batch = pack_collate(samples)
    assert batch["tokens"].shape == (9, DIM)
    assert batch["cu_seqlens"].dtype == torch.int32 and batch["cu_seqlens"].tolist() == [0, 2, 6, 6, 9]
    assert batch["max_seqlen"] == 4
    for i, sample in enumerate(samples):
        lo, hi = batch["cu_seqlens"][i], batch["cu_seqlens"][i + 1]
        assert torch.equal(batch["tokens"][lo:hi], sample["tokens"])
        assert torch.equal(batch["positions"][lo:hi], sample["positions"])
    assert batch["keys"] == ["k0", "k1", "k2", "k3"]


def test_collate_rejects_mixed_grids_and_empty_batches():
    samples = _samples([1, 1])
    samples[1]["side"] = 5
    with pytest.raises(ValueError, match="side"):
        pad_collate(samples)
    with pytest.raises(ValueError, match="empty"):
        pack_collate([])


def test_pack_samples_fills_each_budget_greedily_in_order():
    lengths = [5, 3, 2, 7, 1, 1, 8, 0, 4]
    samples = _samples(lengths)
    groups = list(pack_samples(iter(samples), max_tokens=8))
    assert [s["key"] for g in groups for s in g] == [s["key"] for s in samples]
    sums = [sum(len(s["tokens"]) for s in g) for g in groups]
    assert all(total <= 8 for total in sums)
    assert sums == [8, 2, 7 + 1, 1, 8 + 0, 4]  # [5,3] [2] [7,1] [1] [8,0] [4]
    for group, nxt in zip(groups, groups[1:]):  # greedy: the next group's first sample did not fit
        assert sum(len(s["tokens"]) for s in group) + len(nxt[0]["tokens"]) > 8
    assert [len(g) for g in pack_samples(_samples([1] * 5), max_tokens=100, max_samples=2)] == [2, 2, 1]


def test_pack_samples_refuses_a_sample_larger_than_the_budget():
    with pytest.raises(ValueError, match="k1.*keeps 9 tokens"):
        list(pack_samples(_samples([2, 9]), max_tokens=8))


def test_token_budget_batcher_yields_collated_packs():
    batches = list(TokenBudgetBatcher(_samples([4, 4, 4, 1]), max_tokens=8))
    assert [b["keys"] for b in batches] == [["k0", "k1"], ["k2", "k3"]]
    assert [b["cu_seqlens"].tolist() for b in batches] == [[0, 4, 8], [0, 4, 5]]
