"""Pieces of the epoch benchmarks (bench_pipeline.py's ``epoch`` section, bench_gpu.py): a
training epoch through steph's trainer and data pipeline, the pipeline's reading alone, bags
held in memory, and a sampler of GPU utilisation."""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def train_epoch(data: Sequence[dict[str, Any]], make_model: Callable[[], Any], cfg: Any,
                runs: Path, workers: int, prefetch: int = 2) -> Callable[[], dict[str, Any]]:
    """A function that trains a fresh model for ``cfg.epochs`` (1) epoch(s) with
    :func:`steph.training.fit` (a new run folder each call, deleted after) and returns its last
    log row."""
    from steph.training.trainer import fit

    def run() -> dict[str, Any]:
        runs.mkdir(parents=True, exist_ok=True)
        out = Path(tempfile.mkdtemp(dir=runs))
        try:
            res = fit(make_model(), data, cfg, out, progress=False, workers=workers,
                      prefetch=prefetch)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        return res.history[-1]
    return run


def load_pass(data: Sequence[dict[str, Any]], order: Sequence[int], device: Any, workers: int,
              prefetch: int = 2) -> Callable[[], None]:
    """The data pipeline without a model: every bag of ``order`` read (by ``workers``
    processes) and moved to ``device`` in its stored dtype."""
    import torch

    from steph.data.loader import BagLoader

    def run() -> None:
        with BagLoader(data, workers=workers, device=device, dtype=torch.float16,
                       prefetch=prefetch, persistent=False) as loader:
            for _ in loader.iterate(order):
                pass
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return run


def in_memory(data: Any, n: int, distinct: int) -> list[dict[str, Any]]:
    """``n`` items over ``distinct`` bags of a BagDataset read once (stored dtype, on the host):
    a compute-only epoch (training time depends on the bags' shape, not their values)."""
    held = [data.item(i, stored=True) for i in range(min(distinct, len(data), n))]
    return [held[i % len(held)] for i in range(n)]


def drop_from_page_cache(paths: Sequence[Path]) -> None:
    """Evict the files' clean pages from the page cache (Linux; a no-op elsewhere)."""
    if not hasattr(os, "posix_fadvise"):
        return
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class UtilizationSampler:
    """Samples the GPU's utilisation (percent of time a kernel ran) every ``interval`` seconds
    in a thread, from ``torch.cuda.utilization`` (NVML through pynvml) or, without it,
    ``nvidia-smi --query-gpu=utilization.gpu``. Use as a context manager around the work."""

    def __init__(self, device: Any, interval: float = 0.25):
        self.device, self.interval = device, interval
        self.samples: list[float] = []
        self.source: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _smi_id(self) -> str:
        index = self.device.index or 0
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible:
            return visible.split(",")[index].strip()
        return str(index)

    def read(self) -> float | None:
        import torch

        if self.source in (None, "torch.cuda.utilization"):
            try:
                value = float(torch.cuda.utilization(self.device))
                self.source = "torch.cuda.utilization"
                return value
            except (ImportError, RuntimeError, ValueError, AttributeError):  # no pynvml
                if self.source is not None:
                    return None
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu",
                                  "--format=csv,noheader,nounits", "-i", self._smi_id()],
                                 capture_output=True, text=True, timeout=5, check=True)
            self.source = "nvidia-smi"
            return float(out.stdout.strip().splitlines()[0])
        except (OSError, ValueError, IndexError, subprocess.SubprocessError):
            self.source = "unavailable"
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            value = self.read()
            if value is not None:
                self.samples.append(value)
            elif self.source == "unavailable":
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> UtilizationSampler:  # noqa: PYI034
        if self.device.type == "cuda":
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def summary(self) -> dict[str, Any]:
        s = sorted(self.samples)
        if not s:
            return {"samples": 0, "source": self.source}
        return {"samples": len(s), "source": self.source, "mean": statistics.fmean(s),
                "median": statistics.median(s), "p10": s[len(s) // 10], "max": s[-1]}


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out
