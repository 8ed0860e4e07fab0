"""Triton kernels for the sparse step: the same three gather/scatter products as pipeline/sparse_topk.py.

decoder="triton" runs them on CUDA; the plain PyTorch versions in sparse_topk.py stay the reference that
tests/test_triton_topk.py compares them with (on the CPU through Triton's interpreter, TRITON_INTERPRET=1).
Each program keeps a [BLOCK_M, BLOCK_D] block of partial sums, in float32 (float64 for float64 tables), and
reduces it once at the end; W's gradient reads the rows in latent-sorted order, so every sum is deterministic:
no atomics.
"""

from contextlib import nullcontext

import torch
import triton
import triton.language as tl

from pipeline.sparse_topk import SparseKernels, sort_by_latent

BLOCK_D = 128  # columns of d_model per program
BLOCK_M = 32  # gathered rows per loop iteration


def on_device_of(tensor: torch.Tensor):
    """Triton launches on the current CUDA device and its stream: make that the tensor's (a no-op on the CPU)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else nullcontext()


@triton.jit
def _gather_sum_kernel(indices, weights, table, out, m, d, IS_FP64: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    """out[row, cols] = sum_j weights[row, j] * table[indices[row, j], cols]."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = cols < d
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float64 if IS_FP64 else tl.float32)
    for start in range(0, m, BLOCK_M):
        js = start + tl.arange(0, BLOCK_M)
        in_m = js < m
        latent = tl.load(indices + row * m + js, mask=in_m, other=0).to(tl.int64)
        weight = tl.load(weights + row * m + js, mask=in_m, other=0).to(acc.dtype)
        tile = tl.load(table + latent[:, None] * d + cols[None, :], mask=in_m[:, None] & in_d[None, :], other=0)
        acc += tile.to(acc.dtype) * weight[:, None]
    tl.store(out + row * d + cols, tl.sum(acc, axis=0).to(out.dtype.element_ty), mask=in_d)


@triton.jit
def _gather_dot_kernel(indices, table, rows, out, m, d, IS_FP64: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    """out[row, j] = <rows[row], table[indices[row, j]]>."""
    row = tl.program_id(0).to(tl.int64)
    js = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_m = js < m
    latent = tl.load(indices + row * m + js, mask=in_m, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float64 if IS_FP64 else tl.float32)
    for start in range(0, d, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        in_d = cols < d
        x = tl.load(rows + row * d + cols, mask=in_d, other=0).to(acc.dtype)
        tile = tl.load(table + latent[:, None] * d + cols[None, :], mask=in_m[:, None] & in_d[None, :], other=0)
        acc += tile.to(acc.dtype) * x[None, :]
    tl.store(out + row * m + js, tl.sum(acc, axis=1).to(out.dtype.element_ty), mask=in_m)


@triton.jit
def _segment_sum_kernel(offsets, row_of_entry, sorted_weights, rows, out, d, IS_FP64: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[latent, cols] = sum over the latent's entries e in offsets[latent]:offsets[latent + 1] of
    sorted_weights[e] * rows[row_of_entry[e], cols]."""
    latent = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = cols < d
    first, end = tl.load(offsets + latent), tl.load(offsets + latent + 1)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float64 if IS_FP64 else tl.float32)
    for start in range(first, end, BLOCK_M):
        entries = start + tl.arange(0, BLOCK_M)
        in_segment = entries < end
        row = tl.load(row_of_entry + entries, mask=in_segment, other=0).to(tl.int64)
        weight = tl.load(sorted_weights + entries, mask=in_segment, other=0).to(acc.dtype)
        tile = tl.load(rows + row[:, None] * d + cols[None, :], mask=in_segment[:, None] & in_d[None, :], other=0)
        acc += tile.to(acc.dtype) * weight[:, None]
    tl.store(out + latent * d + cols, tl.sum(acc, axis=0).to(out.dtype.element_ty), mask=in_d)


def gather_sum(indices: torch.Tensor, weights: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """out[b] = sum_j weights[b, j] * table[indices[b, j]]: [batch, d], in table's dtype."""
    (batch, m), d = indices.shape, table.shape[1]
    out = table.new_empty(batch, d)
    if batch:
        grid = (batch, triton.cdiv(d, BLOCK_D))
        with on_device_of(out):
            _gather_sum_kernel[grid](indices.contiguous(), weights.contiguous(), table.contiguous(), out, m, d,
                                     table.dtype == torch.float64, BLOCK_M, BLOCK_D)
    return out


def gather_dot(indices: torch.Tensor, table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """out[b, j] = <rows[b], table[indices[b, j]]>: [batch, m], in table's dtype."""
    (batch, m), d = indices.shape, table.shape[1]
    out = table.new_empty(batch, m)
    if batch and m:
        grid = (batch, triton.cdiv(m, BLOCK_M))
        with on_device_of(out):
            _gather_dot_kernel[grid](indices.contiguous(), table.contiguous(), rows.contiguous(), out, m, d,
                                     table.dtype == torch.float64, BLOCK_M, BLOCK_D)
    return out


def segment_sum(indices: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor, n_latents: int) -> torch.Tensor:
    """out[n] = sum of weights[b, j] * rows[b] over the (b, j) with indices[b, j] == n: [n_latents, d]."""
    d = rows.shape[1]
    out = rows.new_zeros(n_latents, d)
    if indices.numel():
        row_of_entry, sorted_weights, offsets = sort_by_latent(indices, weights, n_latents)
        grid = (n_latents, triton.cdiv(d, BLOCK_D))
        with on_device_of(out):
            _segment_sum_kernel[grid](offsets, row_of_entry, sorted_weights, rows.contiguous(), out, d,
                                      rows.dtype == torch.float64, BLOCK_M, BLOCK_D)
    return out


class TritonDecode(torch.autograd.Function):
    """sparse_topk.decode with Triton kernels in both directions."""

    @staticmethod
    def forward(ctx, values, indices, W_dec):
        ctx.save_for_backward(values, indices, W_dec)
        return gather_sum(indices, values, W_dec)

    @staticmethod
    def backward(ctx, grad_out):
        values, indices, W_dec = ctx.saved_tensors
        grad_out = grad_out.to(W_dec.dtype)
        grad_values = grad_W_dec = None
        if ctx.needs_input_grad[0]:
            grad_values = gather_dot(indices, W_dec, grad_out).to(values.dtype)
        if ctx.needs_input_grad[2]:
            grad_W_dec = segment_sum(indices, values.to(W_dec.dtype), grad_out, W_dec.shape[0])
        return grad_values, None, grad_W_dec


def decode(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """(values, indices): [batch, k] -> sum of the k gathered rows of W_dec: [batch, d_model]."""
    return TritonDecode.apply(values, indices, W_dec)


KERNELS = SparseKernels(gather_sum=gather_sum, segment_sum=segment_sum, decode=decode)
