"""Where and in what dtype the model and the SAE run, decided once from the command's options and passed down; and
the CPUs a process may use."""

import math
import os
from pathlib import Path

import torch

from pipeline.errors import CrosscodersError


def resolve_device(spec: str) -> torch.device:
    """auto (a GPU when there is one), cpu, cuda, cuda:1, ...; refused in one line when this machine lacks it."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise CrosscodersError(f"--device {spec!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CrosscodersError(f"--device {spec}: this machine has no CUDA GPU (or torch is a CPU build); use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CrosscodersError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA GPU(s); use cuda:0 to "
                               f"cuda:{torch.cuda.device_count() - 1}")
    if device.type not in ("cpu", "cuda"):
        raise CrosscodersError(f"--device {spec}: only cpu and cuda devices are supported")
    if device.index is not None:
        torch.cuda.set_device(device)  # streams, events and Triton launch on the current device, so make it this one
    return device


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on device; to a GPU through pinned memory without waiting, where a plain copy from pageable
    memory would wait for the GPU to finish the work queued before it."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def usable_cpus(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """The CPUs this process may use: those it may run on (its affinity where the system keeps one: taskset, a
    container's cpuset), fewer where a container's CPU quota allows less time than that (rounded up)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cpu_quota(Path(cgroup_root))
    return min(cpus, max(math.ceil(quota), 1)) if quota is not None else cpus


def cpu_quota(root: Path) -> float | None:
    """CPUs' worth of time a cgroup quota grants (cgroup v2's cpu.max, v1's cpu.cfs_quota_us), None without one."""
    try:
        if (root / "cpu.max").exists():
            quota, period = (root / "cpu.max").read_text().split()[:2]
        else:
            folder = next((root / name for name in ("cpu", "cpu,cpuacct") if (root / name / "cpu.cfs_quota_us").exists()), None)
            if folder is None:
                return None
            quota, period = ((folder / name).read_text().strip() for name in ("cpu.cfs_quota_us", "cpu.cfs_period_us"))
        if quota in ("max", "-1") or int(period) <= 0:
            return None
        return int(quota) / int(period)
    except (OSError, ValueError):  # unreadable or of another form: no quota known
        return None


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls beat float32 ones here: on GPUs with bf16 tensor cores (from Ampere, sm_80), and on CPUs
    with AVX512-BF16 or AMX (a 2.3x faster matmul on dev-cpu, docs/BENCHMARKS.md); the others emulate bf16 at float32's speed or below."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return any(getattr(torch.cpu, check, lambda: False)() for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def resolve_model_dtype(spec: str, device: torch.device, stored: str | None = None) -> torch.dtype:
    """The dtype asked for; auto is `stored` (an existing store's, so its rows never mix two), else bf16 where it is native.

    `stored` is read before the store is validated: a value that is no model dtype is left for that check to report."""
    if spec == "auto":
        recorded = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}  # by torch's name
        if isinstance(stored, str) and stored in recorded:
            return recorded[stored]
        return torch.bfloat16 if native_bf16(device) else torch.float32
    names = {"bf16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if spec not in names:
        raise CrosscodersError(f"--model-dtype {spec!r} is not one of auto, {', '.join(names)}")
    return names[spec]
