"""Resumable loaders over a compress output's manifest."""

from pipeline.loader.dataset import (
    READ_COLUMNS,
    PrunedTokenDataset,
    PrunedTokenLoader,
    data_file_urls,
    ray_collate_fn,
    read_pruned,
    shuffle_buffer_order,
    split_range,
)

__all__ = ["READ_COLUMNS", "PrunedTokenDataset", "PrunedTokenLoader", "data_file_urls", "ray_collate_fn",
           "read_pruned", "shuffle_buffer_order", "split_range"]
