"""Reused batch buffers must never be handed out again while anything still holds a batch or a view of it."""

from collections import UserDict

import pytest
import torch
from pruned_fixtures import write_output

from pipeline.loader import PrunedTokenDataset, PrunedTokenLoader
from pipeline.loader.collate import pad_collate
from pipeline.loader.shared_batches import HELD_KEY

SHARDS = [11, 6, 9, 14]


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("pooled") / "tiny" / "fixture")
    return root, write_output(root, SHARDS)


def _check(tokens, keys, lengths, expected):
    for i, key in enumerate(keys):
        n = int(lengths[i])
        assert torch.equal(tokens[i, :n], expected[key]["tokens"]), key
        assert not tokens[i, n:].any(), key


def _check_packed(batch, expected):
    for key, tokens in zip(batch["keys"], batch["tokens"].split(batch["lengths"].tolist())):
        assert torch.equal(tokens, expected[key]["tokens"]), key


@pytest.mark.parametrize("num_workers", [0, 2])
def test_held_batches_and_views_keep_their_contents_while_later_batches_reuse_buffers(output, num_workers):
    root, expected = output
    loader = PrunedTokenLoader(PrunedTokenDataset(root, shuffle_buffer=5), batch_size=2, num_workers=num_workers)
    held, views, seen = [], [], []
    for i, batch in enumerate(loader):
        assert HELD_KEY not in batch
        seen += batch["keys"]
        if i % 3 == 0:
            held.append(batch)  # the whole batch
        elif i % 3 == 1:  # only a view of its tokens: the buffer stays taken too
            views.append((batch["tokens"][:, :], list(batch["keys"]), batch["lengths"].clone()))
        del batch
    assert sorted(seen) == sorted(expected)
    for batch in held:
        _check(batch["tokens"], batch["keys"], batch["lengths"], expected)
    for tokens, keys, lengths in views:
        _check(tokens, keys, lengths, expected)


def test_without_workers_a_dropped_batch_buffer_is_reused(output):
    root, expected = output
    loader = PrunedTokenLoader(PrunedTokenDataset(root, shuffle_buffer=5, shuffle=False), batch_size=4)
    pointers = []
    for batch in loader:
        _check(batch["tokens"], batch["keys"], batch["lengths"], expected)
        pointers.append(batch["tokens"].data_ptr())
    assert len(set(pointers)) <= 4 < len(pointers)  # the loop holds one batch while the next is made


def test_a_batch_that_is_not_a_dict_keeps_its_buffers_for_good(output):
    """The pool cannot follow such a batch to the training loop, so it gives the buffers up to it."""
    root, expected = output
    loader = PrunedTokenLoader(PrunedTokenDataset(root, shuffle_buffer=5), batch_size=3, num_workers=2,
                               collate_fn=lambda samples: UserDict(pad_collate(samples)))
    batches = list(loader)
    assert sum(len(b["keys"]) for b in batches) == len(expected)
    for batch in batches:
        _check(batch["tokens"], batch["keys"], batch["lengths"], expected)


def test_packed_batches_made_inside_the_workers_are_held_as_safely(output):
    root, expected = output
    loader = PrunedTokenLoader(PrunedTokenDataset(root, shuffle_buffer=5), max_tokens=24, num_workers=2)
    batches = list(loader)
    assert sorted(k for b in batches for k in b["keys"]) == sorted(expected)
    for batch in batches:
        assert HELD_KEY not in batch
        _check_packed(batch, expected)
