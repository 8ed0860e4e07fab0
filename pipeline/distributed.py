"""Data parallelism under torchrun: which process this is, and sums across processes (no-ops in a single process)."""

import hashlib
import json
import os
import typing
from contextlib import contextmanager

import torch
import torch.distributed as dist

from pipeline.errors import CrosscodersError, one_line


def init_from_env(device: torch.device, backend: str | None = None) -> tuple[int, int]:
    """Join the process group torchrun describes in the environment; (rank, world_size), (0, 1) without torchrun.

    The backend defaults to NCCL on GPUs and gloo elsewhere."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"))
    return rank(), world_size()


def local_device(device: torch.device) -> torch.device:
    """`cuda` means this process's own GPU (cuda:LOCAL_RANK) under torchrun."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CrosscodersError(f"--device {device} would put every process of this torchrun job on one GPU; use --device "
                               "cuda, and each process takes its own (cuda:LOCAL_RANK)")
    return device


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """The process that writes files and prints: rank 0, or the only one."""
    return rank() == 0


def barrier():
    if world_size() > 1:
        dist.barrier()


def all_reduce_sum(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Element-wise sums over processes, in one collective; tensors share a dtype and device. Returns new tensors."""
    if world_size() == 1:
        return tensors
    flat = torch.cat([t.flatten() for t in tensors])
    dist.all_reduce(flat)
    return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def from_main(value):
    """Rank 0's value (anything picklable) in every process."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)  # under NCCL through the process's own GPU, which local_device set
    return box[0]


@contextmanager
def refused_together() -> typing.Iterator[None]:
    """Checks that some processes may refuse (rank 0's lock on a folder, its disk check): a refusal in any process is
    raised in every one, the lowest rank's, so none waits in a collective for a process that stopped and all say why
    alike."""
    if world_size() == 1:
        yield
        return
    refusal = None
    try:
        yield
    except Exception as error:  # an unforeseen error too (a store that cannot be written): the others must not wait
        refusal = error
    refusals = [None] * world_size()
    told = None if refusal is None else str(refusal) if isinstance(refusal, CrosscodersError) else one_line(refusal)
    dist.all_gather_object(refusals, told)  # NCCL: through local_device's GPU
    first = next((message for message in refusals if message is not None), None)
    if refusal is not None and told == first:
        raise refusal
    if first is not None:
        raise CrosscodersError(first)


def all_gather_ints(values: list[int]) -> list[list[int]]:
    """Every process's `values` (same length everywhere), by rank; needs a gloo process group."""
    if world_size() == 1:
        return [list(values)]
    gathered = [torch.zeros(len(values), dtype=torch.long) for _ in range(world_size())]
    dist.all_gather(gathered, torch.tensor(values, dtype=torch.long))
    return [t.tolist() for t in gathered]


def check_same_settings(settings: dict) -> None:
    """Refuse, in one line, settings that differ between the processes: each node of a job runs its own command, and
    a process with other options would hang stage one or train another SAE without a word."""
    if world_size() == 1:
        return
    fields = flat_fields(settings)
    if not any(_differ([len(fields), _digest(fields)])):
        return
    if _differ([len(fields)])[0]:
        raise CrosscodersError("the processes of this job were given different settings (such as --sweep); start every "
                               "process with the same options")
    differing = [option_name(name) for name, differs in zip(fields, _differ([_digest(value) for value in fields.values()])) if differs]
    raise CrosscodersError(f"the processes of this job were given different {', '.join(dict.fromkeys(differing))}; start "
                           "every process with the same options")


def option_name(field: str) -> str:
    """The command-line option of a flat_fields name: "runs.0.lr" -> "--lr"."""
    return "--" + next(part for part in reversed(field.split(".")) if not part.isdigit()).replace("_", "-")


def flat_fields(value, name: str = "") -> dict:
    """{"a.b.0": leaf} for every leaf of nested dicts and lists."""
    if isinstance(value, dict | list | tuple):
        items = value.items() if isinstance(value, dict) else enumerate(value)
        return {path: leaf for key, item in items for path, leaf in flat_fields(item, f"{name}.{key}" if name else str(key)).items()}
    return {name: value}


def _digest(value) -> int:
    """A 56-bit hash of a JSON-able value, the same in every process."""
    text = json.dumps(value, sort_keys=True, default=str)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=7).digest(), "little")


def _differ(values: list[int]) -> list[bool]:
    """For each value, whether it differs between processes (under gloo or NCCL)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    low = torch.tensor(values, dtype=torch.int64, device=device)
    high = low.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return (low != high).tolist()


def close():
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def all_to_all_rows(tensors: list[torch.Tensor], destination: torch.Tensor) -> list[torch.Tensor]:
    """Sends row i of each tensor to process destination[i]; returns the rows this process received,
    by sending rank, each sender's rows in their order. Tensors share a device (CUDA under NCCL)."""
    if world_size() == 1:
        return tensors
    order = torch.argsort(destination, stable=True)
    send_counts = torch.bincount(destination, minlength=world_size())
    receive_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(receive_counts, send_counts)
    send_splits, receive_splits = send_counts.tolist(), receive_counts.tolist()
    received = []
    for tensor in tensors:
        wire = tensor[order]
        if wire.dtype in (torch.bfloat16, torch.float16):  # sent as bytes: not every backend moves these dtypes
            wire = wire.view(torch.uint8)
        out = wire.new_empty((sum(receive_splits), *wire.shape[1:]))
        dist.all_to_all_single(out, wire, output_split_sizes=receive_splits, input_split_sizes=send_splits)
        received.append(out.view(tensor.dtype))
    return received
