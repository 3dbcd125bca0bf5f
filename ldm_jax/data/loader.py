"""Shuffled, repeatable, per-process-sharded batching with background prefetch.

The whole input pipeline is a pure function of one integer. The example stream is the
concatenation of per-epoch permutations of ``range(len(source))`` (epoch ``e`` is permuted by
``np.random.default_rng([seed, e])``), and global batch ``step`` is stream positions
``[step * B, (step + 1) * B)`` (``B`` = global batch size; a batch may straddle two epochs, so
no example is dropped and datasets smaller than ``B`` work). Process ``p`` of ``P`` takes the
contiguous slice ``[p * B / P, (p + 1) * B / P)`` of each global batch, so the concatenation of
all processes' local batches is exactly the batch a single process would see.

Resuming therefore needs no iterator state: store ``iterator.position`` (global batches
consumed) in the checkpoint and call ``loader.iterate(start_step=position)``.

Batches are dicts of NumPy arrays (``image float32 [b, H, W, C]``, ``label int32 [b]``,
``index int32 [b]``: the source indices, handy for debugging) plus ``caption``: a ``list[str]``
of length ``b`` that stays on the host (the trainer tokenizes it).
:func:`make_global_batch` turns the array part into globally sharded ``jax.Array``s.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Mapping, Optional

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ldm_jax.data.source import DataSource

HOST_KEYS = ("caption",)  # batch entries that stay Python objects on the host


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class IndexSampler:
    """Maps a global step to the source indices of its global batch (and a process's slice).

    Args:
      num_examples: dataset length N.
      global_batch_size: B, examples per step summed over all processes.
      seed: shuffle seed; epoch ``e`` uses the permutation ``default_rng([seed, e])``.
      shuffle: False keeps the stream ``0, 1, ..., N-1, 0, 1, ...`` (evaluation).
    """

    def __init__(self, num_examples: int, global_batch_size: int, seed: int = 0, shuffle: bool = True):
        self.num_examples = _check_int("num_examples", num_examples, 1)
        self.global_batch_size = _check_int("global_batch_size", global_batch_size, 1)
        self.seed = _check_int("seed", seed, 0)
        self.shuffle = bool(shuffle)

        self._permutations: dict[int, np.ndarray] = {}  # the last few epochs' permutations
        self._lock = threading.Lock()

    def epoch_permutation(self, epoch: int) -> np.ndarray:
        """int64 [N]: the order in which epoch ``epoch`` visits the examples."""
        if not self.shuffle:
            return np.arange(self.num_examples, dtype=np.int64)
        with self._lock:
            permutation = self._permutations.get(epoch)
            if permutation is None:
                permutation = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
                if len(self._permutations) >= 3:
                    self._permutations.pop(min(self._permutations))
                self._permutations[epoch] = permutation
            return permutation

    def stream_indices(self, start: int, stop: int) -> np.ndarray:
        """int64 [stop - start]: source indices at stream positions ``[start, stop)``."""
        positions = np.arange(start, stop, dtype=np.int64)
        epochs, offsets = np.divmod(positions, self.num_examples)
        out = np.empty_like(positions)
        for epoch in np.unique(epochs):
            selected = epochs == epoch
            out[selected] = self.epoch_permutation(int(epoch))[offsets[selected]]
        return out

    def global_batch_indices(self, step: int) -> np.ndarray:
        """int64 [B]: the source indices of global batch ``step``."""
        step = _check_int("step", step, 0)
        return self.stream_indices(step * self.global_batch_size, (step + 1) * self.global_batch_size)

    def local_batch_indices(self, step: int, process_index: int, process_count: int) -> np.ndarray:
        """int64 [B / P]: process ``process_index``'s contiguous slice of global batch ``step``."""
        process_count = _check_int("process_count", process_count, 1)
        process_index = _check_int("process_index", process_index, 0)
        if process_index >= process_count:
            raise ValueError(f"process_index {process_index} must be < process_count {process_count}")
        if self.global_batch_size % process_count:
            raise ValueError(
                f"global batch size {self.global_batch_size} is not divisible by process_count {process_count}"
            )
        step = _check_int("step", step, 0)
        local = self.global_batch_size // process_count
        start = step * self.global_batch_size + process_index * local
        return self.stream_indices(start, start + local)


def collate(examples: list[dict[str, Any]], indices: np.ndarray) -> dict[str, Any]:
    """Stacks examples into a batch; ``caption`` becomes a list of str, ``index`` int32 [b]."""
    batch: dict[str, Any] = {}
    for key in examples[0]:
        values = [example[key] for example in examples]
        if key in HOST_KEYS:
            batch[key] = [str(v) for v in values]
        else:
            batch[key] = np.stack([np.asarray(v) for v in values])
    batch["index"] = np.asarray(indices, dtype=np.int32)
    return batch


def make_global_batch(local_batch: Any, sharding: NamedSharding, global_batch_size: int | None = None) -> Any:
    """Assembles each process's rows of a global batch into global ``jax.Array``s sharded along
    the batch (the one function for this; the training loop uses it too).

    Only ``sharding.spec[0]`` (the batch-dimension entry) is used, so the same sharding works
    for images ``[b, H, W, C]`` and labels ``[b]``; every other dimension is replicated. The
    global batch size is ``global_batch_size`` (default ``b * process_count``). Host entries
    (captions) are passed through unchanged, and so is a leaf that already is a global
    ``jax.Array`` of the global batch size.
    """
    batch_spec = sharding.spec[0] if len(sharding.spec) else None
    batch_sharding = NamedSharding(sharding.mesh, PartitionSpec(batch_spec))

    def one(x):
        if isinstance(x, jax.Array) and global_batch_size is not None and x.shape[:1] == (global_batch_size,):
            return x
        x = np.asarray(x)
        global_shape = None if global_batch_size is None else (int(global_batch_size), *x.shape[1:])
        return jax.make_array_from_process_local_data(batch_sharding, x, global_shape)

    if isinstance(local_batch, Mapping):
        return {key: value if key in HOST_KEYS else jax.tree.map(one, value) for key, value in local_batch.items()}
    return jax.tree.map(one, local_batch)


class DataLoader:
    """Per-process batches from a random-access source; see the module docstring.

    Args:
      source: any :class:`~ldm_jax.data.source.DataSource`.
      global_batch_size: B summed over processes; must be divisible by ``process_count``.
      seed, shuffle: see :class:`IndexSampler`.
      process_index, process_count: default to ``jax.process_index()`` / ``jax.process_count()``.
      num_threads: threads that read examples of one batch in parallel (Pillow and file I/O
        release the GIL); 1 reads serially, which is best for in-memory sources.
    """

    def __init__(
        self,
        source: DataSource,
        global_batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        process_index: Optional[int] = None,
        process_count: Optional[int] = None,
        num_threads: int = 1,
    ):
        self.source = source
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        self.sampler = IndexSampler(len(source), global_batch_size, seed, shuffle)
        # Validates the process split once, up front.
        self.sampler.local_batch_indices(0, self.process_index, self.process_count)
        self.global_batch_size = self.sampler.global_batch_size
        self.local_batch_size = self.global_batch_size // self.process_count
        self.num_threads = _check_int("num_threads", num_threads, 1)
        self._pool = ThreadPoolExecutor(self.num_threads, "ldm_jax_data") if self.num_threads > 1 else None

    @property
    def steps_per_epoch(self) -> float:
        return len(self.source) / self.global_batch_size

    def local_indices(self, step: int) -> np.ndarray:
        return self.sampler.local_batch_indices(step, self.process_index, self.process_count)

    def get_batch(self, step: int) -> dict[str, Any]:
        """This process's local batch of global step ``step`` (a pure function of ``step``)."""
        indices = self.local_indices(step)
        if self._pool is None:
            examples = [self.source[int(i)] for i in indices]
        else:
            examples = list(self._pool.map(lambda i: self.source[int(i)], indices))
        return collate(examples, indices)

    def iterate(
        self,
        start_step: int = 0,
        num_steps: Optional[int] = None,
        *,
        prefetch: int = 2,
        sharding: Optional[NamedSharding] = None,
    ) -> "BatchIterator":
        """Iterator over local batches ``start_step, start_step + 1, ...`` (forever by default).

        ``prefetch`` batches are prepared ahead by a background thread (0: synchronous). With
        ``sharding``, the thread also assembles global ``jax.Array``s (:func:`make_global_batch`),
        overlapping the host-to-device copy with the training step.
        """
        return BatchIterator(self, start_step, num_steps, prefetch, sharding)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


_DONE = object()


def _make_batch(loader: DataLoader, sharding: Optional[NamedSharding], step: int) -> dict:
    batch = loader.get_batch(step)
    return batch if sharding is None else make_global_batch(batch, sharding)


def _put(out: queue.Queue, stopped: threading.Event, item) -> bool:
    """Blocks until there is room or the iterator is closed; returns False if closed."""
    while not stopped.is_set():
        try:
            out.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _produce(loader, sharding, step, stop_step, out: queue.Queue, stopped: threading.Event) -> None:
    try:
        while not stopped.is_set() and (stop_step is None or step < stop_step):
            if not _put(out, stopped, _make_batch(loader, sharding, step)):
                return
            step += 1
        _put(out, stopped, _DONE)
    except BaseException as error:  # surfaced to the consumer on its next __next__
        _put(out, stopped, _Failure(error))


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class BatchIterator(Iterator[dict]):
    """Yields batches from a :class:`DataLoader`; ``position`` = global batches consumed.

    ``position`` is ``start_step`` plus the number of batches returned so far, i.e. the step to
    resume from. Use as a context manager (or call ``close()``) to stop the prefetch thread.
    """

    def __init__(self, loader: DataLoader, start_step: int, num_steps: Optional[int], prefetch: int,
                 sharding: Optional[NamedSharding]):
        self.loader = loader
        self.position = _check_int("start_step", start_step, 0)
        self._stop_step = None if num_steps is None else self.position + _check_int("num_steps", num_steps, 0)
        self._prefetch = _check_int("prefetch", prefetch, 0)
        self._sharding = sharding
        self._stopped = threading.Event()
        self._queue: Optional[queue.Queue] = None
        self._thread: Optional[threading.Thread] = None
        if self._prefetch > 0:
            self._queue = queue.Queue(maxsize=self._prefetch)
            # The thread gets no reference to the iterator, so an abandoned iterator is garbage
            # collected and its __del__ stops the thread.
            self._thread = threading.Thread(
                target=_produce,
                args=(loader, sharding, self.position, self._stop_step, self._queue, self._stopped),
                name="ldm_jax_prefetch",
                daemon=True,
            )
            self._thread.start()

    def _make(self, step: int) -> dict:
        return _make_batch(self.loader, self._sharding, step)

    def __next__(self) -> dict:
        if self._stop_step is not None and self.position >= self._stop_step:
            raise StopIteration
        if self._queue is None:
            batch = self._make(self.position)
        else:
            if self._stopped.is_set():
                raise StopIteration
            item = self._queue.get()
            if item is _DONE:
                raise StopIteration
            if isinstance(item, _Failure):
                self.close()
                raise item.error
            batch = item
        self.position += 1
        return batch

    def close(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def __enter__(self) -> "BatchIterator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        stopped = getattr(self, "_stopped", None)  # absent if __init__ raised early
        if stopped is not None:
            stopped.set()
