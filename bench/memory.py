"""Memory figures for benchmarks: resident memory split by kind, and memory bandwidth."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class ResidentMemory:
    """Resident set in bytes: anonymous (heap, tensors) and file-backed (memory-mapped files)."""

    anonymous: int
    file_backed: int


def resident_memory() -> ResidentMemory:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("RssAnon", "RssFile"):
            fields[name] = int(value.split()[0]) * 1024
    return ResidentMemory(anonymous=fields.get("RssAnon", 0), file_backed=fields.get("RssFile", 0))


class PeakMemory:
    """Polls resident memory on a thread and keeps the peak of each kind."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.anonymous = 0
        self.file_backed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.is_set():
            now = resident_memory()
            self.anonymous = max(self.anonymous, now.anonymous)
            self.file_backed = max(self.file_backed, now.file_backed)
            time.sleep(self.interval)


def read_bandwidth(*, size_bytes: int = 2 * 1024**3, repeats: int = 5) -> float:
    """Bytes per second for reading a buffer far larger than the caches (best of ``repeats``)."""
    buffer = torch.ones(size_bytes // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - started)
    return size_bytes / best
