"""Device and precision resolution (steph.utils.device), tested without a GPU: CUDA and mps
are mocked where a test needs them."""

from __future__ import annotations

import pytest
import torch

from steph.errors import ConfigError
from steph.utils import device as D


@pytest.fixture
def machine(monkeypatch):
    """Pretend this machine has ``cuda`` CUDA devices and/or mps."""

    def set_(cuda: int = 0, mps: bool = False, bf16: bool = True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda **kw: bf16)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Mock GPU")
        monkeypatch.setattr(D, "mps_available", lambda: mps)
        monkeypatch.setattr(torch.amp, "is_autocast_available", lambda kind: True)

    return set_


def test_auto_prefers_cuda_then_mps_then_cpu(machine):
    machine(cuda=0, mps=False)
    assert D.resolve_device("auto") == torch.device("cpu")
    assert D.resolve_device(None) == torch.device("cpu")
    machine(cuda=0, mps=True)
    assert D.resolve_device("auto") == torch.device("mps")
    machine(cuda=2, mps=True)
    assert D.resolve_device("auto") == torch.device("cuda", 0)
    assert D.resolve_device("cuda") == torch.device("cuda", 0)
    assert D.resolve_device("CUDA:1") == torch.device("cuda", 1)
    assert D.resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("spec, cuda, mps, needle", [
    ("cuda", 0, False, "CUDA is not available on this machine"),
    ("cuda:0", 0, True, "CUDA is not available on this machine"),
    ("cuda:2", 2, False, "has 2 CUDA device(s) (cuda:0 to cuda:1)"),
    ("mps", 1, False, "mps) is not available"),
    ("gpu", 1, True, "must be auto, cpu, cuda, cuda:N or mps"),
])
def test_missing_devices_are_one_line_config_errors(machine, spec, cuda, mps, needle):
    machine(cuda=cuda, mps=mps)
    with pytest.raises(ConfigError) as err:
        D.resolve_device(spec)
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith("train.device")  # names the setting at fault


def test_real_machine_without_cuda_says_why():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        D.resolve_device("cuda", option="--device")


def test_precision(machine):
    cpu = torch.device("cpu")
    assert D.check_precision(cpu, "fp32") is None
    assert D.check_precision(cpu, "bf16") is torch.bfloat16  # CPU autocast does bf16
    assert D.check_precision(cpu, "fp16") is torch.float16
    with pytest.raises(ConfigError, match="must be one of"):
        D.check_precision(cpu, "int8")
    machine(cuda=1, bf16=False)
    gpu = torch.device("cuda", 0)
    assert D.check_precision(gpu, "fp16") is torch.float16
    with pytest.raises(ConfigError) as err:
        D.check_precision(gpu, "bf16")
    assert "cuda:0 (Mock GPU) does not support bf16" in str(err.value)
    machine(cuda=1, bf16=True)
    assert D.check_precision(gpu, "bf16") is torch.bfloat16


def test_autocast_and_autocast_off():
    lin = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    with D.autocast(torch.device("cpu"), None):
        assert lin(x).dtype == torch.float32
    with D.autocast(torch.device("cpu"), torch.bfloat16):
        assert lin(x).dtype == torch.bfloat16
        with D.autocast_off(x):
            assert lin(x).dtype == torch.float32
        assert lin(x).dtype == torch.bfloat16
    with D.autocast_off(x):  # outside autocast: nothing to switch off
        assert lin(x).dtype == torch.float32


def test_grad_scaler_only_for_fp16():
    cpu = torch.device("cpu")
    assert not D.grad_scaler(cpu, "fp32").is_enabled()
    assert not D.grad_scaler(cpu, "bf16").is_enabled()
    assert D.grad_scaler(cpu, "fp16").is_enabled()


def test_rng_state_of_a_cuda_run_and_its_resume_elsewhere(monkeypatch):
    """On CUDA the device's generator is saved too; restored where there is one, seeded from
    the fallback when the checkpoint came from another kind of device."""
    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda d: torch.arange(4, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d: calls.append(("set", s.tolist())))
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda s: calls.append(("seed", s)))
    gpu = torch.device("cuda", 0)
    state = D.rng_state(gpu)
    assert set(state) == {"rng.torch", "rng.cuda"}
    assert all(t.device.type == "cpu" for t in state.values())
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    cpu_state = D.rng_state(torch.device("cpu"))
    assert set(cpu_state) == {"rng.torch"}
    torch.rand(5)
    D.set_rng_state(cpu_state, torch.device("cpu"), fallback_seed=7)
    assert torch.equal(torch.rand(3), expected)  # the CPU generator restored
    calls.clear()  # torch.manual_seed seeds every CUDA device too
    D.set_rng_state(state, gpu, fallback_seed=7)  # GPU -> GPU: its state
    D.set_rng_state(cpu_state, gpu, fallback_seed=7)  # CPU checkpoint resumed on a GPU
    assert calls == [("set", [0, 1, 2, 3]), ("seed", 7)]
    D.set_rng_state(state, torch.device("cpu"), fallback_seed=7)  # GPU checkpoint on a CPU
    assert len(calls) == 2
