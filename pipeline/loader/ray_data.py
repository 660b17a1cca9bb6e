"""Ray Data readers of a compress output; the only loader module that imports Ray."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.fs
import ray.data
from ray.data.collate_fn import ArrowBatchCollateFn

from pipeline.loader.collate import pad_collate
from pipeline.loader.reading import SampleDecoder, committed_output, passthrough_to_read, token_columns
from pipeline.storage import filesystem_for


def read_pruned(
    path: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    columns: Sequence[str] | None = None,
    **read_kwargs: Any,
):
    """A ``ray.data.Dataset`` of the manifest's (committed) files; pair with :func:`ray_collate_fn`."""
    output = committed_output(path, storage_options)
    fs, _ = filesystem_for(output.output_dir, dict(storage_options or {}))
    arrow_fs = pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))
    paths = [filesystem_for(f.url, dict(storage_options or {}))[1] for f in output.files]
    columns = [*token_columns(output.meta["dtype"]), *passthrough_to_read(output.schema, columns)]
    return ray.data.read_parquet(paths, filesystem=arrow_fs, columns=columns, **read_kwargs)


def ray_collate_fn(
    path: str,
    storage_options: Mapping[str, Any] | None = None,
    collate: Callable[[list[dict[str, Any]]], Any] = pad_collate,
):
    """An ``iter_torch_batches(collate_fn=...)`` for :func:`read_pruned`: Arrow batches -> ``collate(samples)``."""
    meta = committed_output(path, storage_options).meta

    class PrunedBatchCollate(ArrowBatchCollateFn):
        def __call__(self, batch: pa.Table) -> Any:
            columns = tuple(name for name in batch.column_names if name not in token_columns(meta["dtype"]))
            return collate(SampleDecoder(meta["dtype"], meta["dim"], meta["side"], columns).samples(batch))

    return PrunedBatchCollate()
