"""Resumable loaders over a compress output's manifest.

``order`` (which rows each worker reads, in what order), ``reading`` (the committed files and their rows),
``dataset`` (the torch ``IterableDataset``), ``dataloader`` (the counting DataLoader), ``collate`` (batching) and
``ray_data`` (the Ray Data path; import it from there, as this package does not import Ray).
"""

from pipeline.loader.dataloader import PrunedTokenLoader
from pipeline.loader.dataset import PrunedTokenDataset
from pipeline.loader.order import shuffle_buffer_order, split_range
from pipeline.loader.reading import READ_COLUMNS, data_file_urls

__all__ = ["READ_COLUMNS", "PrunedTokenDataset", "PrunedTokenLoader", "data_file_urls", "shuffle_buffer_order",
           "split_range"]
