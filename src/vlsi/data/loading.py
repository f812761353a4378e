"""Training batches, built in the training process or off it, in ``DataLoader`` workers (``--num-workers``).

A batch is built in two halves. The *order* is the run's :class:`vlsi.data.records.BatchStream`, which
lives in the training process: it alone decides which records come next and its position (epoch, cursor)
is what a checkpoint keeps. The *work* — reading the records, decoding their images, encoding and
collating them — is :class:`BuildBatch`, a picklable function of the indices alone, so it runs the same
in a worker as in the training process.

With workers, the ``DataLoader``'s sampler is a copy of the stream that hands out index lists ahead of
training (``prefetch_factor`` per worker), each with the stream position after it; the workers build the
batches and the ``DataLoader`` returns them in the order they were asked for. Each time the training
process takes a batch it moves its own stream to that batch's position, so a checkpoint saves the position
of the last batch trained on, not of the last one prefetched: the batches, their order and a resume are
those of the in-process path. Workers count nothing: a skipped record comes back with the batch as
(name, reason, message) and is counted and logged by the training process, in the run's summary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from vlsi.data.records import BatchStream, ChatDataset, collate, record_name

# A stream whose batches are all bad is a broken input, not bad luck.
MAX_EMPTY_BATCHES = 1000


@dataclass
class Built:
    """One micro-batch as a worker hands it back: the collated tensors (None when every record was
    skipped), the names of the records it holds, the skips ``(source, index, name, reason, message)``, and
    the stream position after it."""

    indices: list[int]
    batch: dict | None
    names: list[str] = field(default_factory=list)
    skipped: list[tuple] = field(default_factory=list)
    state: dict | None = None


@dataclass
class BuildBatch:
    """Encodes the records at ``indices`` of a dataset and collates the usable ones (``collate_fn``:
    :func:`vlsi.data.records.collate`, or a pair's). A step that adds to a batch (a cached teacher's
    distributions) overrides :meth:`batch`."""

    pad_id: int
    collate_fn: Callable = collate

    def __call__(self, dataset: ChatDataset, indices: list[int]) -> Built:
        kept, skipped = [], []
        for i in indices:
            item, skip = dataset.encode(i)
            if skip is None:
                kept.append((i, item))
            else:
                skipped.append(skip)
        batch = self.batch(dataset, kept) if kept else None
        names = [name_of(dataset, i) for i, _ in kept] if batch is not None else []
        return Built(list(indices), batch, names, skipped)

    def batch(self, dataset: ChatDataset, kept: list[tuple[int, dict]]) -> dict | None:
        return self.collate_fn([item for _, item in kept], self.pad_id)


def name_of(dataset: ChatDataset, index: int) -> str:
    return record_name(dataset.records[index], index)


class Batch(dict):
    """A collated micro-batch (tensors by name) that also knows which records it holds, so that a step
    stopped for a non-finite loss can name them. ``record_ids`` is an attribute, not an entry: every entry
    is fed to the model."""

    record_ids: list[str]


def take(dataset: ChatDataset, built: Built) -> Batch | None:
    """``built`` received by the training process: its skips counted in ``dataset.skips`` (the run's
    summary), its batch returned (None when it has none)."""
    for skip in built.skipped:
        dataset.skips.add(*skip)
    if built.batch is None:
        return None
    batch = Batch(built.batch)
    batch.record_ids = built.names
    return batch


def build_next(stream: BatchStream, dataset: ChatDataset, build: BuildBatch) -> Batch:
    """The next non-empty micro-batch of ``stream``, built in this process; a batch whose every record was bad
    is skipped whole."""
    return BatchLoader(build)(stream, dataset)


class _Jobs(torch.utils.data.Sampler):
    """The sampler: a copy of the stream, from its position when the loader started, handing out each
    micro-batch's indices with the position after it. Runs in the training process."""

    def __init__(self, stream: BatchStream):
        self.stream = dataclasses.replace(stream)  # same seed, shard and lengths; its own position

    def __iter__(self):
        while True:
            indices = self.stream.next_indices()
            yield indices, self.stream.state()


class _InWorker(torch.utils.data.Dataset):
    """What a worker runs for one job: the batch of its indices, stamped with the position after it."""

    def __init__(self, dataset: ChatDataset, build: BuildBatch):
        self.dataset, self.build = dataset, build

    def __getitem__(self, job: tuple[list[int], dict]) -> Built:
        indices, state = job
        built = self.build(self.dataset, indices)
        built.state = state
        return built


def _as_is(built: Built) -> Built:
    return built


class BatchLoader:
    """The training loop's ``fetch`` (:func:`vlsi.train.training.train`): ``loader(stream, dataset)`` is the
    next non-empty micro-batch of ``stream``.

    ``num_workers`` 0 builds it here, when asked. Otherwise ``num_workers`` worker
    processes build batches ahead, ``prefetch_factor`` each (the module's docstring says why the result is
    the same). The workers start at the first batch, after a resume has set the stream's position, and start
    again from the stream's position if anything else moved it; :meth:`close` stops them.
    """

    def __init__(self, build: BuildBatch, num_workers: int = 0, prefetch_factor: int = 2):
        if num_workers < 0 or prefetch_factor < 1:
            raise ValueError(f"--num-workers must be >= 0 and --prefetch-factor >= 1, got {num_workers}, "
                             f"{prefetch_factor}")  # fmt: skip
        self.build, self.num_workers, self.prefetch_factor = build, num_workers, prefetch_factor
        self._batches = None
        self._position = None  # the stream's position when this loader last moved it

    def __call__(self, stream: BatchStream, dataset: ChatDataset, pad_id: int | None = None) -> Batch:
        """``pad_id`` is the build's; taken for the ``fetch`` signature."""
        for _ in range(MAX_EMPTY_BATCHES):
            batch = take(dataset, self._next(stream, dataset))
            if batch is not None:
                return batch
        raise RuntimeError(f"{dataset.path}: {MAX_EMPTY_BATCHES} consecutive batches had no usable record")

    def next_indices(self, stream: BatchStream, dataset: ChatDataset) -> list[int]:
        """The next micro-batch's indices only, the stream moved past them (an on-policy batch, whose records
        the step encodes as prompts itself; a worker's batch of them is dropped)."""
        if not self.num_workers:
            return stream.next_indices()
        return self._next(stream, dataset).indices

    def _next(self, stream: BatchStream, dataset: ChatDataset) -> Built:
        """The next batch as built, the stream moved to the position after it."""
        if not self.num_workers:
            return self.build(dataset, stream.next_indices())
        if self._batches is None or stream.state() != self._position:
            self.close()
            loader = torch.utils.data.DataLoader(
                _InWorker(dataset, self.build),
                sampler=_Jobs(stream),
                batch_size=None,
                collate_fn=_as_is,
                num_workers=self.num_workers,
                prefetch_factor=self.prefetch_factor,
            )
            self._batches = iter(loader)
        built = next(self._batches)
        stream.load(built.state)
        self._position = stream.state()
        return built

    def close(self) -> None:
        if self._batches is not None:
            shutdown = getattr(self._batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            self._batches = None
