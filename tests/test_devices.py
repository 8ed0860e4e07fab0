from pathlib import Path

import pytest
import torch

from pipeline import devices
from pipeline.devices import native_bf16, resolve_model_dtype


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads the CPU's flags from Linux's /proc/cpuinfo")
def test_bf16_is_native_on_cpus_with_bf16_instructions():
    flags = set(Path("/proc/cpuinfo").read_text().split())
    assert native_bf16(torch.device("cpu")) == bool(flags & {"avx512_bf16", "amx_tile"})


@pytest.mark.parametrize("capability, native", [((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_bf16_is_native_on_gpus_with_bf16_tensor_cores(monkeypatch, capability, native):
    """V100 (7.0) and T4 (7.5) emulate it; A100 (8.0) and H100 (9.0) have it."""
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: asked.append(device) or capability)
    assert native_bf16(torch.device("cuda:1")) == native
    assert asked == [torch.device("cuda:1")]


@pytest.mark.parametrize("stored", ["bf16", "int8", ["float32"], None])
def test_model_dtype_auto_ignores_a_recorded_value_that_is_no_model_dtype(stored, monkeypatch):
    """Read before the store is checked: the check reports it, in one line, rather than torch failing on it."""
    monkeypatch.setattr(devices, "native_bf16", lambda device: False)
    assert resolve_model_dtype("auto", torch.device("cpu"), stored) == torch.float32
    assert resolve_model_dtype("auto", torch.device("cpu"), "float16") == torch.float16
