"""Batches prepared ahead of the training step, on a background thread.

:class:`PrefetchingLoader` wraps an :class:`~sparse_sae.training.data.ActivationLoader`: a thread reads,
shuffles and checks the next ``depth`` batches while the step runs, and on a GPU copies each
from pinned host memory on a side stream, so the step never waits for the disk or a pageable
copy. Only that thread touches the wrapped loader, so the order of rows is the loader's own
(exactly reproducible); ``state_dict()`` is the position after the last batch *taken*, not
after the last one prepared, so a checkpoint resumes exactly. Memory is bounded: at most
``depth`` batches wait, plus the loader's shuffle buffer.
"""
from __future__ import annotations

import queue
import threading

import torch


class PrefetchingLoader:
    """``next_batch()`` gives ``loader``'s batches, on ``device`` in ``dtype``; see the module docstring."""

    def __init__(self, loader, device: torch.device, dtype: torch.dtype, depth: int = 2):
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self.loader, self.device, self.dtype, self.depth = loader, torch.device(device), dtype, depth
        self._state = loader.state_dict()
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The wrapped loader's position after the last batch taken by :meth:`next_batch`."""
        return dict(self._state)

    def load_state_dict(self, state: dict) -> None:
        self.close()   # what was prepared belongs to the old position
        self.loader.load_state_dict(state)
        self._state = self.loader.state_dict()

    @property
    def skipped_rows(self) -> int:
        return int(self._state.get("skipped_rows", 0))

    # ------------------------------------------------------------------ the thread
    def _produce(self) -> None:
        if self._stream is not None:   # the current device is per thread: without this, pinning and
            torch.cuda.set_device(self.device)   # the stream switch would open a context on GPU 0
        while not self._stop.is_set():
            try:
                item = self._prepare(self.loader.next_batch())
            except BaseException as exc:   # handed to the consumer at this batch's place
                item = exc
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def _prepare(self, rows: torch.Tensor):
        state = self.loader.state_dict()
        if self._stream is None:
            return rows.to(self.dtype), state, None
        rows = rows.pin_memory()
        with torch.cuda.stream(self._stream):
            x = rows.to(self.device, self.dtype, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self._stream)
        return x, state, ready

    def _start(self) -> None:
        self._stop.clear()
        self._queue = queue.Queue(maxsize=self.depth)
        self._thread = threading.Thread(target=self._produce, name="sparse_sae-prefetch", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public
    def next_batch(self) -> torch.Tensor:
        """The next batch on the device (the copy ordered before any work queued after this call)."""
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if isinstance(item, BaseException):   # the thread has ended; a retry starts from the last batch taken
            self._thread.join()
            self._thread = None
            self.loader.load_state_dict(self._state)
            raise item
        x, self._state, ready = item
        if ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(ready)
            x.record_stream(current)   # the side stream's allocation is now used on this one
        return x

    def close(self) -> None:
        """Stops the thread and drops the prepared batches (the next call starts again from the
        position of the last batch taken)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.loader.load_state_dict(self._state)
        self._queue = None
