"""grain input pipelines: global batches assembled from per-process slices.

Global batch `j` always holds the same examples in the same order, whatever the number of processes:
rows `[start, stop)` of it are read by the process whose devices hold those rows, and only by it.
This is what makes a 2-process run reproduce a 1-process run, and what lets grain's iterator state
(one integer per process) be checkpointed beside the model for exact resumption.
"""
from __future__ import annotations

from typing import Any, Callable

import grain


def _local_batch(batch_index: int, *, examples: grain.MapDataset, global_batch: int, rows: tuple[int, int],
                 collate: Callable[[list[Any]], Any]) -> Any:
    """Rows `[start, stop)` of global batch `batch_index`."""
    start = batch_index * global_batch
    return collate([examples[start + row] for row in range(*rows)])


def batched(examples: grain.MapDataset, *, global_batch: int, rows: tuple[int, int], num_batches: int,
            collate: Callable[[list[Any]], Any]) -> grain.MapDataset:
    """A MapDataset whose element j is this process's rows of global batch j."""
    return grain.MapDataset.range(num_batches).map(
        lambda j: _local_batch(j, examples=examples, global_batch=global_batch, rows=rows, collate=collate))
