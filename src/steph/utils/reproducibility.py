"""Bit-identical reruns: what decides the bits of a result besides the seeds, and its settings.

Measured on CPU (torch 2.13, MKL 2024.2, see the README's reproducibility section):

- The **number of intra-op threads** changes the bits: BLAS and torch's own reductions split
  sums by thread. torch takes its default from the CPU affinity and ``OMP_NUM_THREADS``, so two
  processes of the same command can differ (a cluster job given other cores, a resumed run).
- MKL's **conditional numerical reproducibility** in strict mode (``MKL_CBWR=AUTO,STRICT``)
  makes its matrix products independent of the thread count; ABMIL training is then identical
  for any thread count. It must be set before MKL initialises, which is MKL's first call (the
  first matrix product), not ``import torch``: ``steph/__init__.py`` sets it when the
  environment does not, before anything imports torch.
- Not covered by MKL's strict mode: matrix-vector products and torch's full reductions, which
  STEPH's merge uses; they are deterministic for a fixed thread count. So a run pins its
  thread count (``train.threads``, else the count torch chose when the run started) and a
  resumed run keeps the count recorded in its checkpoint.
- Memory alignment of the bags (h5py arrays are only 16-byte aligned) and machine load made no
  difference in any experiment.

On CUDA, ``train.deterministic`` also switches on torch's deterministic algorithms,
``CUBLAS_WORKSPACE_CONFIG=:4096:8`` and deterministic cuDNN without benchmarking.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from pathlib import Path
from typing import Any

# Set by steph/__init__.py unless the environment already has a value (any value switches
# MKL's conditional numerical reproducibility on; STRICT makes products thread-count-free).
MKL_CBWR_DEFAULT = "AUTO,STRICT"
CUBLAS_WORKSPACE_DEFAULT = ":4096:8"
_CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")

log = logging.getLogger("steph.reproducibility")

_BRANCHES = {0: "UNSET", 1: "OFF", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 6: "SSSE3",
             7: "SSE4_1", 8: "SSE4_2", 9: "AVX", 10: "AVX2", 11: "AVX512_MIC", 12: "AVX512",
             13: "AVX512_MIC_E1", 14: "AVX512_E1"}
_STRICT = 0x10000


def request_mkl_cnr(environ: Any = os.environ) -> None:
    """Ask MKL for strict conditional numerical reproducibility unless the user chose a mode.

    Takes effect only if MKL has not initialised yet (its first call)."""
    if not environ.get("MKL_CBWR"):
        environ["MKL_CBWR"] = MKL_CBWR_DEFAULT


def decode_cbwr(value: int) -> str:
    """MKL's ``mkl_cbwr_get`` value as the ``MKL_CBWR`` spelling (e.g. ``AUTO,STRICT``)."""
    name = _BRANCHES.get(value & 0xFFFF, hex(value & 0xFFFF))
    return name + (",STRICT" if value & _STRICT else "")


@functools.lru_cache(maxsize=1)
def _mkl_cbwr_get() -> Any:
    import torch

    lib_dir = Path(torch.__file__).parent / "lib"
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib", "torch_cpu.dll"):
        if (lib_dir / name).exists():
            try:
                fn = ctypes.CDLL(str(lib_dir / name)).mkl_serv_cbwr_get
            except (OSError, AttributeError):
                return None
            fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
            return fn
    return None


def mkl_cnr_mode() -> str | None:
    """MKL's active reproducibility mode (``"OFF"``, ``"AUTO,STRICT"``, ...), or None when
    this torch build has no MKL to ask. (Asking initialises MKL's mode from the
    environment, as its first call would.)"""
    fn = _mkl_cbwr_get()
    return None if fn is None else decode_cbwr(int(fn(-1)))


def configure(deterministic: bool, threads: int | None) -> dict[str, Any]:
    """Apply a run's reproducibility settings to this process; return what is in effect.

    Pins torch's intra-op thread count to `threads` (None: keep the current count, which is
    then recorded). With `deterministic`, torch's deterministic algorithms are switched on (on
    CPU they change nothing measurable) and, where CUDA is available, cuBLAS's fixed workspace
    and deterministic cuDNN without benchmarking. Without it torch's switches are left as they
    are (the thread count is still pinned and recorded)."""
    import torch

    n = int(threads) if threads else torch.get_num_threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    info: dict[str, Any] = {"threads": n, "deterministic": bool(deterministic),
                            "mkl_cbwr": mkl_cnr_mode(), "torch": torch.__version__}
    if not deterministic:
        return info
    torch.use_deterministic_algorithms(True)
    if torch.cuda.is_available():
        if os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in _CUBLAS_DETERMINISTIC:
            # read when cuBLAS creates its first handle: before any CUDA work of the run
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE_DEFAULT
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        info["cuda"] = {"cublas_workspace_config": os.environ["CUBLAS_WORKSPACE_CONFIG"],
                        "cudnn_deterministic": True, "cudnn_benchmark": False}
    mode = info["mkl_cbwr"]
    if mode is not None and not mode.endswith("STRICT"):
        log.warning("MKL's reproducible mode is %s, not strict (MKL started before steph was "
                    "imported, or MKL_CBWR is set otherwise): results are bit-identical only "
                    "with the same thread count (%d); import steph before torch or set "
                    "MKL_CBWR=%s", mode, n, MKL_CBWR_DEFAULT)
    return info
