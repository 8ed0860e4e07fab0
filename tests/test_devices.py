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


@pytest.mark.parametrize("files, quota", [
    ({}, None),
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({"cpu,cpuacct/cpu.cfs_quota_us": "50000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, 0.5),
    ({"cpu.max": "garbled"}, None),
])
def test_a_containers_cpu_quota_is_read_from_either_cgroup_version(tmp_path, files, quota):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert devices.cpu_quota(tmp_path) == quota


def test_usable_cpus_are_the_affinitys_lowered_to_the_quota_rounded_up(tmp_path, monkeypatch):
    monkeypatch.setattr(devices.os, "sched_getaffinity", lambda pid: set(range(16)))
    assert devices.usable_cpus(str(tmp_path)) == 16  # no quota
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert devices.usable_cpus(str(tmp_path)) == 3
    (tmp_path / "cpu.max").write_text("20000 100000\n")
    assert devices.usable_cpus(str(tmp_path)) == 1
    (tmp_path / "cpu.max").write_text("3200000 100000\n")
    assert devices.usable_cpus(str(tmp_path)) == 16  # a quota above the CPUs it may run on
