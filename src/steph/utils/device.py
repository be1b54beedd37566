"""Where steph computes and in which precision (``train.device``, ``train.precision``,
``--device``), and the random-number state of a device.

Device names: ``auto`` (CUDA if available, else Apple's ``mps``, else the CPU), ``cpu``,
``cuda`` (the current CUDA device), ``cuda:N``, ``mps``. Asking for a device this machine does
not have, or for a precision the device cannot compute in, is a :class:`ConfigError` with a
one-line message (the CLI prints it and exits non-zero).

Precisions: ``fp32`` (default, no autocast), ``bf16`` and ``fp16`` (autocast for the network's
forward pass; fp16 also needs a gradient scaler, which the trainer adds). Code that must stay in
float32 inside an autocast region (a merge of task vectors, the merge coefficients) wraps itself
in :func:`autocast_off`.
"""

from __future__ import annotations

import contextlib
import re
from contextlib import AbstractContextManager
from typing import Any

import torch

from steph.errors import ConfigError

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
DEVICE_PATTERN = r"auto|cpu|mps|cuda(:\d+)?"
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16,
                                             "fp16": torch.float16}
_CPU = torch.device("cpu")


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def _no_cuda_reason() -> str:
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support"
    return "no CUDA device is visible (driver, CUDA_VISIBLE_DEVICES)"


def resolve_device(spec: str | torch.device | None = "auto", option: str = "train.device"
                   ) -> torch.device:
    """The ``torch.device`` a device name stands for on this machine (``auto``: CUDA, else
    ``mps``, else CPU). ``option`` names the setting in error messages."""
    text = ("auto" if spec is None else str(spec)).strip().lower()
    match = re.fullmatch(DEVICE_PATTERN, text)
    if match is None:
        raise ConfigError(f"{option} must be {DEVICE_CHOICES}; got {spec!r}")
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if mps_available() else _CPU
    if text == "cpu":
        return _CPU
    if text == "mps":
        if not mps_available():
            raise ConfigError(f"{option}={text}: Apple's Metal backend (mps) is not available "
                              "on this machine; use cpu or auto")
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise ConfigError(f"{option}={text}: CUDA is not available on this machine "
                          f"({_no_cuda_reason()}); use cpu or auto")
    count = torch.cuda.device_count()
    index = int(text.split(":")[1]) if ":" in text else torch.cuda.current_device()
    if index >= count:
        raise ConfigError(f"{option}={text}: this machine has {count} CUDA device(s) "
                          f"(cuda:0 to cuda:{count - 1})")
    return torch.device("cuda", index)


def device_label(device: torch.device) -> str:
    """``cpu``, ``mps``, ``cuda:0``: how logs name a device."""
    if device.type == "cuda":
        return f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    return device.type


def device_description(device: torch.device) -> str:
    """The label plus the hardware's name where torch knows it (for run records)."""
    label = device_label(device)
    if device.type == "cuda":
        with contextlib.suppress(Exception):
            return f"{label} ({torch.cuda.get_device_name(device)})"
    return label


def _cuda_bf16(device: torch.device) -> bool:
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # older signature
        major, _ = torch.cuda.get_device_capability(device)
        return major >= 8


def check_precision(device: torch.device, precision: str, option: str = "train.precision"
                    ) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device`` (None for fp32); a ConfigError when
    the device cannot compute in it."""
    if precision not in PRECISIONS:
        raise ConfigError(f"{option} must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return None
    if not torch.amp.is_autocast_available(device.type):
        raise ConfigError(f"{option}={precision}: torch has no autocast for "
                          f"{device_label(device)}; use fp32")
    ok = True
    if device.type == "cuda" and dtype == torch.bfloat16:
        ok = _cuda_bf16(device)
    elif device.type == "mps":
        try:
            torch.ones(1, device=device, dtype=dtype)
        except (RuntimeError, TypeError):
            ok = False
    if not ok:
        raise ConfigError(f"{option}={precision}: {device_description(device)} does not support "
                          f"{precision} (bf16 needs a CUDA GPU of compute capability 8.0 or newer, "
                          "or macOS 14 on mps); use fp16 or fp32")
    return dtype


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[Any]:
    """Autocast to ``dtype`` on ``device`` (a no-op context for fp32, ``dtype=None``)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def autocast_off(tensor: torch.Tensor) -> AbstractContextManager[Any]:
    """Full precision for the code inside, on ``tensor``'s device, even within an autocast
    region (merges and merge coefficients are computed in float32)."""
    kind = tensor.device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.autocast(kind, enabled=False)
    return contextlib.nullcontext()


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A gradient scaler, enabled only for fp16 (a pass-through otherwise)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


# -- random-number state ---------------------------------------------------------------------

def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The generators a training step on ``device`` draws from (dropout): the CPU's always,
    the device's own when it has one. CPU byte tensors, device-independent."""
    out = {"rng.torch": torch.get_rng_state()}
    if device.type == "cuda":
        out["rng.cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        out["rng.mps"] = torch.mps.get_rng_state()
    return out


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device,
                  fallback_seed: int) -> None:
    """Restore :func:`rng_state`'s generators on ``device``. A checkpoint written on another
    kind of device has no state for this one: its generator is then seeded with
    ``fallback_seed`` (a resume across device kinds is deterministic, not bit-identical)."""
    torch.set_rng_state(state["rng.torch"].cpu())
    if device.type == "cuda":
        key, restore, seed = ("rng.cuda", lambda s: torch.cuda.set_rng_state(s, device),
                              torch.cuda.manual_seed_all)
    elif device.type == "mps":
        key, restore, seed = "rng.mps", torch.mps.set_rng_state, torch.mps.manual_seed
    else:
        return
    if key in state:
        restore(state[key].cpu())
    else:
        seed(int(fallback_seed))
