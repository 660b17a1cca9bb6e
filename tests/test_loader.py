import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pruned_fixtures import fixture_meta, fixture_table, write_output

from pipeline.loader import PrunedTokenDataset, PrunedTokenLoader, shuffle_buffer_order, split_range
from pipeline.loader.order import decode_mask, encode_mask, window_order
from pipeline.loader.reading import LocalCache
from pipeline.output.manifest import IncompleteOutputError

SHARDS = [11, 6, 9, 14]  # 40 rows in row groups of 4


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("pruned") / "tiny" / "fixture")
    return root, write_output(root, SHARDS)


def _keys(loader, stop_after=None):
    keys = []
    for i, batch in enumerate(loader):
        keys += batch["keys"]
        if i + 1 == stop_after:
            break
    return keys


def _loader(root, *, num_workers=2, batch_size=3, max_tokens=None, state=None, **dataset_kwargs):
    dataset = PrunedTokenDataset(root, **{"shuffle_buffer": 5, **dataset_kwargs})
    loader = PrunedTokenLoader(dataset, batch_size=None if max_tokens else batch_size, max_tokens=max_tokens,
                               num_workers=num_workers)
    if state is not None:
        loader.load_state_dict(state)
    return loader


def test_shuffle_buffer_order_is_a_permutation_that_never_looks_past_the_buffer():
    order = shuffle_buffer_order(200, 8, np.random.default_rng(0)).tolist()
    assert sorted(order) == list(range(200)) and order != list(range(200))
    assert all(index < emitted + 8 for emitted, index in enumerate(order))  # bounds the rows a reader holds
    assert shuffle_buffer_order(5, 1, np.random.default_rng(0)).tolist() == [0, 1, 2, 3, 4]
    assert [split_range(10, 4, p) for p in range(4)] == [(0, 2), (2, 5), (5, 7), (7, 10)]


def test_window_order_permutes_each_window_and_masks_round_trip():
    order = window_order(23, 5, np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(23)) and order.tolist() != list(range(23))
    assert all(index < (emitted // 5 + 1) * 5 for emitted, index in enumerate(order.tolist()))  # one window held
    # Windows end where a file does: [0, 5) [5, 7) | [7, 12) [12, 14) | [14, 19) [19, 23).
    order = window_order(23, 5, np.random.default_rng(0), breaks=[7, 14]).tolist()
    windows = [(0, 5), (5, 7), (7, 12), (12, 14), (14, 19), (19, 23)]
    assert [sorted(order[lo:hi]) for lo, hi in windows] == [list(range(lo, hi)) for lo, hi in windows]
    mask = np.random.default_rng(1).random(1001) < 0.3
    assert np.array_equal(decode_mask(encode_mask(mask), 1001), mask)
    with pytest.raises(ValueError, match="positions"):
        decode_mask(encode_mask(mask), 2000)


def test_a_worker_is_done_with_one_file_before_it_reads_the_next(output):
    root, _ = output
    dataset = PrunedTokenDataset(root, shuffle_buffer=5)
    starts = dataset._file_starts()
    for stream in range(2):
        positions = dataset.stream_positions(2, stream)
        files = np.searchsorted(starts, positions, side="right")
        assert (np.diff(files) >= 0).all() and sorted(positions.tolist()) != positions.tolist()


def test_shuffle_window_is_sized_in_bytes(output):
    root, _ = output
    dataset = PrunedTokenDataset(root)
    row_bytes = sum(f.bytes for f in dataset.files) // dataset.total_rows
    assert PrunedTokenDataset(root, shuffle_buffer_bytes=7 * row_bytes).shuffle_buffer == 7
    assert PrunedTokenDataset(root, shuffle_buffer_bytes=7 * row_bytes, shuffle_buffer=3).shuffle_buffer == 3


def test_stored_dtype_samples_are_views_and_batches_keep_it(output):
    root, expected = output
    dataset = PrunedTokenDataset(root, tokens_dtype=None)
    sample = next(iter(dataset))
    assert sample["tokens"].dtype == torch.float16
    assert torch.equal(sample["tokens"].float(), expected[sample["key"]]["tokens"])
    batch = next(iter(_loader(root, num_workers=2, tokens_dtype=None)))
    assert batch["tokens"].dtype == torch.float16 and batch["tokens"].is_shared()  # collated in shared memory
    key, n = batch["keys"][0], int(batch["lengths"][0])
    assert torch.equal(batch["tokens"][0, :n].float(), expected[key]["tokens"])
    assert not batch["tokens"][0, n:].any() and (batch["positions"][0, n:] == -1).all()


def test_every_key_is_read_exactly_once_across_two_ranks_of_two_workers(output):
    root, expected = output
    per_rank = [_keys(_loader(root, rank=rank, world_size=2)) for rank in (0, 1)]
    assert [len(keys) for keys in per_rank] == [20, 20]
    everything = per_rank[0] + per_rank[1]
    assert sorted(everything) == sorted(expected)


def test_samples_carry_the_stored_tokens_positions_and_caption(output):
    root, expected = output
    seen = 0
    for batch in _loader(root, num_workers=0, batch_size=4):
        for i, key in enumerate(batch["keys"]):
            n = int(batch["lengths"][i])
            assert torch.equal(batch["tokens"][i, :n], expected[key]["tokens"])
            assert torch.equal(batch["positions"][i, :n], expected[key]["positions"])
            assert batch["caption"][i] == expected[key]["caption"]
            seen += 1
    assert seen == len(expected) and batch["side"] == 4


def test_tokens_can_be_decoded_to_bfloat16_for_a_bfloat16_model(output):
    root, expected = output
    batch = next(iter(PrunedTokenLoader(PrunedTokenDataset(root, tokens_dtype=torch.bfloat16), batch_size=4)))
    assert batch["tokens"].dtype == torch.bfloat16
    key, n = batch["keys"][0], int(batch["lengths"][0])
    assert torch.equal(batch["tokens"][0, :n], expected[key]["tokens"].to(torch.bfloat16))


def test_order_is_fixed_by_seed_and_epoch(output):
    root, _ = output

    def order(seed, epoch):
        dataset = PrunedTokenDataset(root, seed=seed, shuffle_buffer=8)
        dataset.set_epoch(epoch)
        return [sample["key"] for sample in dataset]

    assert order(0, 0) == order(0, 0)
    assert order(0, 1) != order(0, 0) and sorted(order(0, 1)) == sorted(order(0, 0))
    assert order(1, 0) != order(0, 0)
    plain = [s["key"] for s in PrunedTokenDataset(root, shuffle=False)]
    assert plain == sorted(plain)  # manifest order, then row order


def test_same_order_through_dataloader_workers_for_the_same_epoch(output):
    root, _ = output
    assert _keys(_loader(root, seed=3)) == _keys(_loader(root, seed=3))


@pytest.mark.parametrize(
    ("num_workers", "batching", "rank", "world_size"),
    [(2, {"batch_size": 3}, 1, 2), (2, {"max_tokens": 12}, 0, 1), (2, {"max_tokens": 16}, 1, 3),
     (0, {"batch_size": 4}, 0, 1), (1, {"max_tokens": 30}, 0, 2)],
)
def test_resume_mid_epoch_yields_exactly_the_remaining_samples(output, num_workers, batching, rank, world_size):
    root, _ = output
    kwargs = {"num_workers": num_workers, "rank": rank, "world_size": world_size, "seed": 7, **batching}
    full = [batch["keys"] for batch in _loader(root, **kwargs)]
    # early, middle, and late enough that a worker with fewer batches has already finished
    for stop_after in sorted({1, len(full) // 2, len(full) - 1}):
        interrupted = _loader(root, **kwargs)
        head = _keys(interrupted, stop_after=stop_after)
        state = json.loads(json.dumps(interrupted.state_dict()))
        assert 0 < sum(state["consumed"]) == len(head)
        tail = [batch["keys"] for batch in _loader(root, state=state, **kwargs)]
        assert head + sum(tail, []) == sum(full, [])  # same samples, same order: nothing repeated or skipped
        assert tail == full[stop_after:]  # and the same batches


def test_resume_without_a_dataloader_and_into_the_next_epoch(output):
    root, expected = output
    dataset = PrunedTokenDataset(root, shuffle_buffer=6)
    head = []
    for sample in dataset:
        head.append(sample["key"])
        if len(head) == 13:
            break
    resumed = PrunedTokenDataset(root, shuffle_buffer=6)
    resumed.load_state_dict(dataset.state_dict())
    tail = [sample["key"] for sample in resumed]
    assert len(head + tail) == len(expected) and set(head + tail) == set(expected)
    next_epoch = [sample["key"] for sample in resumed]  # a finished epoch moves on to the next
    assert resumed.epoch == 1 and next_epoch != head + tail and sorted(next_epoch) == sorted(expected)


def test_loading_a_state_from_other_settings_is_refused(output):
    root, _ = output
    loader = _loader(root, num_workers=2)
    _keys(loader, stop_after=2)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="seed"):
        _loader(root, seed=1, state=state)
    two_ranks = _loader(root, num_workers=2, rank=1, world_size=2)
    _keys(two_ranks, stop_after=1)
    with pytest.raises(ValueError, match="all 2 ranks"):  # an elastic resume needs every rank's state
        _loader(root, state=two_ranks.state_dict())
    with pytest.raises(ValueError, match="rank"):
        _loader(root, rank=0, world_size=2, state=two_ranks.state_dict())
    with pytest.raises(ValueError, match="version"):
        _loader(root, state={**state, "version": 99})


def test_columns_select_passthrough_fields(output):
    root, _ = output
    sample = next(iter(PrunedTokenDataset(root, columns=["json"])))
    assert "json" in sample and "caption" not in sample
    assert "caption" not in next(iter(PrunedTokenDataset(root, columns=[])))
    with pytest.raises(ValueError, match="not stored"):
        PrunedTokenDataset(root, columns=["txt"])


def test_incomplete_output_missing_file_and_changed_file_are_named(tmp_path):
    with pytest.raises(IncompleteOutputError, match="no manifest.parquet"):
        PrunedTokenDataset(str(tmp_path))
    root = tmp_path / "out"
    write_output(str(root), [3, 3])
    (root / "data" / "shard001.0.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="shard001.0.parquet"):
        PrunedTokenDataset(str(root))
    write_output(str(root), [3, 3])
    with open(root / "data" / "shard000.0.parquet", "ab") as handle:
        handle.write(b"x")
    with pytest.raises(ValueError, match="shard000.0.parquet.*changed after the commit"):
        PrunedTokenDataset(str(root))


def test_files_of_another_dtype_in_one_manifest_are_refused(tmp_path):
    root = tmp_path / "out"
    write_output(str(root), [3, 3])
    other, _ = fixture_table(fixture_meta(dtype="bfloat16"), "shard001", 3, np.random.default_rng(1), (1, 4))
    buffer = io.BytesIO()
    pq.write_table(other, buffer)
    (root / "data" / "shard001.0.parquet").write_bytes(buffer.getvalue())
    manifest = pq.read_table(root / "manifest.parquet").to_pylist()
    manifest[1]["bytes"] = len(buffer.getvalue())
    pq.write_table(pq.read_table(root / "manifest.parquet").from_pylist(manifest), root / "manifest.parquet")
    with pytest.raises(ValueError, match=r"shard001.0.parquet.*dtype 'bfloat16' vs 'float16'"):
        list(PrunedTokenDataset(str(root), shuffle=False))


def test_reads_from_s3(s3_bucket, s3_options):
    root = f"s3://{s3_bucket}/compressed/tiny/fixture"
    expected = write_output(root, [5, 4], storage_options=s3_options)
    loader = PrunedTokenLoader(PrunedTokenDataset(root, storage_options=s3_options), batch_size=4, num_workers=2)
    batches = list(loader)
    assert sorted(k for b in batches for k in b["keys"]) == sorted(expected)
    first = batches[0]
    key, n = first["keys"][0], int(first["lengths"][0])
    assert torch.equal(first["tokens"][0, :n], expected[key]["tokens"])


def test_read_pruned_feeds_ray_iter_torch_batches(output):
    ray = pytest.importorskip("ray")
    from pipeline.loader.ray_data import ray_collate_fn, read_pruned

    root, expected = output
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        dataset = read_pruned(root)
        keys = []
        for batch in dataset.iter_torch_batches(batch_size=16, collate_fn=ray_collate_fn(root)):
            for i, key in enumerate(batch["keys"]):
                n = int(batch["lengths"][i])
                assert torch.equal(batch["tokens"][i, :n], expected[key]["tokens"])
                assert torch.equal(batch["positions"][i, :n], expected[key]["positions"])
                assert batch["caption"][i] == expected[key]["caption"]
            assert not batch["attention_mask"][batch["lengths"] == 0].any()
            keys += batch["keys"]
        assert sorted(keys) == sorted(expected)
    finally:
        ray.shutdown()


def _run_ranks(root, world_size, num_workers, states=None, stop_after=None, seed=5):
    """Each rank of a run (optionally stopped after ``stop_after[rank]`` batches): its keys and its state."""
    keys, saved = [], []
    for rank in range(world_size):
        loader = _loader(root, num_workers=num_workers, rank=rank, world_size=world_size, seed=seed, state=states)
        keys += _keys(loader, stop_after=None if stop_after is None else stop_after[rank])
        saved.append(json.loads(json.dumps(loader.state_dict())))
    return keys, saved


@pytest.mark.parametrize(("before", "after", "then"), [((1, 2), (2, 1), None), ((2, 2), (1, 3), (2, 1))])
def test_elastic_resume_delivers_every_sample_of_the_epoch_exactly_once(output, before, after, then):
    root, expected = output
    head, states = _run_ranks(root, *before, stop_after=[2, 3][:before[0]])
    assert 0 < len(head) < len(expected)
    if then is None:
        tail, _ = _run_ranks(root, *after, states=states)
        runs = [head, tail]
    else:  # resumed elastically, stopped again, resumed with yet another shape
        middle, states = _run_ranks(root, *after, states=states, stop_after=[2])
        tail, _ = _run_ranks(root, *then, states=states)
        runs = [head, middle, tail]
    everything = sum(runs, [])
    assert sorted(everything) == sorted(expected)  # every key exactly once across the partial runs
    assert all(len(run) for run in runs)


def _write_wds_output(root, shard_rows, seed=3):
    """A WebDataset output in the contract's layout: tars through the writer's own ``samples_to_wds_tar``."""
    from pruned_fixtures import stage_rows

    from pipeline.output.format import samples_to_wds_tar
    from pipeline.output.manifest import MANIFEST_NAME, MANIFEST_SCHEMA

    meta, rng, expected, manifest = fixture_meta(), np.random.default_rng(seed), {}, []
    (root / "data").mkdir(parents=True)
    for index, rows in enumerate(shard_rows):
        shard = f"shard{index:03d}"
        keys = [f"{shard}/img-{i:03d}" for i in range(rows)]
        tokens = [torch.randn(int(n), 8, generator=torch.Generator().manual_seed(index * 100 + i))
                  for i, n in enumerate(rng.integers(1, 6, rows))]
        positions = [np.arange(len(t)) * 2 for t in tokens]
        staged = stage_rows(meta, keys=keys, source_shard=shard, widths=[8] * rows, heights=[8] * rows,
                            n_tokens=[16] * rows, tokens=tokens, positions=positions, grids=[(0, 0)] * rows,
                            passthrough={"caption": [f"caption {k}" for k in keys]})
        data = samples_to_wds_tar(staged, meta)
        (root / "data" / f"{shard}.0.tar").write_bytes(data)
        manifest.append({"shard_id": shard, "path": f"data/{shard}.0.tar", "rows": rows, "bytes": len(data),
                         "sha256": "", "source_fingerprint": f"fp{index}", "attempt": "0"})
        expected |= {k: (t.half().float(), c) for k, t, c in zip(keys, tokens, [f"caption {k}" for k in keys])}
    pq.write_table(pa.Table.from_pylist(manifest, schema=MANIFEST_SCHEMA), root / MANIFEST_NAME)
    return str(root), expected


def test_webdataset_output_reads_and_resumes_exactly_through_the_same_dataset(tmp_path):
    root, expected = _write_wds_output(tmp_path / "wds", [7, 5, 8])
    kwargs = {"num_workers": 2, "batch_size": 3, "seed": 2, "shuffle_buffer": 4}
    full = [batch["keys"] for batch in _loader(root, **kwargs)]
    assert sorted(sum(full, [])) == sorted(expected) and sum(full, []) != sorted(expected)
    batch = next(iter(_loader(root, **kwargs)))
    for i, key in enumerate(batch["keys"]):
        n = int(batch["lengths"][i])
        assert torch.equal(batch["tokens"][i, :n], expected[key][0]) and batch["caption"][i] == expected[key][1]
    interrupted = _loader(root, **kwargs)
    head = _keys(interrupted, stop_after=2)
    state = json.loads(json.dumps(interrupted.state_dict()))
    tail = [batch["keys"] for batch in _loader(root, state=state, **kwargs)]
    assert head + sum(tail, []) == sum(full, []) and tail == full[2:]
    elastic = _loader(root, **{**kwargs, "num_workers": 1}, state=[state])  # and elastically
    assert sorted(head + _keys(elastic)) == sorted(expected)


def test_a_cached_second_epoch_over_s3_gets_no_token_file(s3_bucket, s3_options, tmp_path, monkeypatch):
    import s3fs

    root = f"s3://{s3_bucket}/compressed/tiny/fixture"
    expected = write_output(root, [5, 4, 6], storage_options=s3_options)
    gets = []
    original = s3fs.S3FileSystem._call_s3

    async def counting(self, method, *args, **kwargs):
        if method == "get_object" and "/data/" in kwargs.get("Key", ""):
            gets.append(kwargs["Key"])
        return await original(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", counting)
    dataset = PrunedTokenDataset(root, storage_options=s3_options, cache_dir=str(tmp_path / "cache"))
    loader = PrunedTokenLoader(dataset, batch_size=4)
    first = _keys(loader)
    assert sorted(first) == sorted(expected) and len(set(gets)) == 3  # each data file fetched once
    gets.clear()
    second = _keys(loader)  # the next epoch: another order, every file from the cache
    assert sorted(second) == sorted(expected) and second != first and gets == []
    small = LocalCache(str(tmp_path / "small"), max_bytes=max(f.bytes for f in dataset.files) + 1)
    for file in dataset.files:
        small.path_for(file, s3_options, root)
    assert sum(p.stat().st_size for p in (tmp_path / "small").iterdir()) <= small.max_bytes  # bounded in bytes
