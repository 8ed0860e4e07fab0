"""The encoder's gradient through top-k, taken only at the kept latents: O(batch * k * d_model) per step.

Autograd would differentiate the dense `x_in @ W_enc` densely, although top-k leaves k nonzeros per row of
its gradient; here the pre-activations come from that dense product computed without grad, and the
backward gathers and scatters the k kept columns of W_enc. The products are plain PyTorch ops here, so CPU
and CUDA alike; pipeline/triton_topk.py has the same three as Triton kernels, with this as their reference.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SparseKernels:
    """The sparse step's products, each [batch, m] indices and weights against a table or rows."""

    gather_sum: Callable  # (indices, weights, table: [n, d]) -> [batch, d]
    segment_sum: Callable  # (indices, weights, rows: [batch, d], n) -> [n, d]
    decode: Callable  # (values, indices, W_dec: [n, d]) -> [batch, d], differentiable in values and W_dec


def sort_by_latent(indices: torch.Tensor, weights: torch.Tensor, n_latents: int):
    """The (b, j) entries of indices, weights: [batch, m] in latent order, as (row b of each entry, its weight,
    offsets: [n_latents + 1] where each latent's run starts and ends). Stable: a latent's entries keep row order."""
    flat = indices.flatten()
    order = flat.argsort(stable=True)  # on the CPU also the faster one
    # searchsorted, not bincount, whose output size depends on the data: on a GPU it would wait for the sort
    offsets = torch.searchsorted(flat[order], torch.arange(n_latents + 1, device=flat.device))
    return order.div(indices.shape[1], rounding_mode="floor"), weights.flatten()[order], offsets


def gather_sum(indices: torch.Tensor, weights: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """out[b] = sum_j weights[b, j] * table[indices[b, j]]: [batch, d], in table's dtype."""
    return F.embedding_bag(indices, table, per_sample_weights=weights.to(table.dtype), mode="sum")


def segment_sum(indices: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor, n_latents: int) -> torch.Tensor:
    """out[n] = sum of weights[b, j] * rows[b] over the (b, j) with indices[b, j] == n: [n_latents, d].

    Sorting the entries by latent makes each latent one bag of F.embedding_bag, which sums them without
    building the [batch * m, d] products.
    """
    row_of_entry, sorted_weights, offsets = sort_by_latent(indices, weights, n_latents)
    return F.embedding_bag(row_of_entry, rows, offsets, per_sample_weights=sorted_weights, mode="sum",
                           include_last_offset=True)


def decode(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """(values, indices): [batch, k] -> sum of the k gathered rows of W_dec: [batch, d_model]; autograd's
    backward of embedding_bag is itself sparse."""
    return gather_sum(indices, values, W_dec)


TORCH_KERNELS = SparseKernels(gather_sum=gather_sum, segment_sum=segment_sum, decode=decode)


class GatherPreActs(torch.autograd.Function):
    """values at indices of relu(x_in @ W_enc + b_enc), with the gradient of only those entries."""

    @staticmethod
    def forward(ctx, x_in, W_enc, b_enc, indices, values, kernels):
        ctx.save_for_backward(x_in, W_enc, indices, values)
        ctx.b_enc_dtype, ctx.kernels = b_enc.dtype, kernels
        return values.clone()  # a new tensor: autograd must not rewrite the caller's values

    @staticmethod
    def backward(ctx, grad_values):
        x_in, W_enc, indices, values = ctx.saved_tensors
        n_latents = W_enc.shape[1]
        grad = (grad_values * (values > 0)).to(W_enc.dtype)  # [batch, m]; ReLU passes no gradient at 0
        grad_x_in = grad_W_enc = grad_b_enc = None
        if ctx.needs_input_grad[0]:
            W_rows = W_enc.T.contiguous()  # [n_latents, d_model]; free when W_enc is stored column-major
            grad_x_in = ctx.kernels.gather_sum(indices, grad, W_rows).to(x_in.dtype)
        if ctx.needs_input_grad[1]:
            grad_W_enc = ctx.kernels.segment_sum(indices, grad, x_in.to(W_enc.dtype), n_latents).T
        if ctx.needs_input_grad[2]:
            grad_b_enc = grad.new_zeros(n_latents, dtype=ctx.b_enc_dtype).index_add_(
                0, indices.flatten(), grad.flatten().to(ctx.b_enc_dtype)
            )
        return grad_x_in, grad_W_enc, grad_b_enc, None, None, None


def gather_pre_acts(
    x_in: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
    kernels: SparseKernels = TORCH_KERNELS,
) -> torch.Tensor:
    """values: [batch, m], the ReLU'd pre-acts at indices: [batch, m], already computed without grad, now with
    gradients for x_in: [batch, d_model], W_enc: [d_model, n_latents] and b_enc: [n_latents].

    A value of 0 (cut by ReLU, or by a mask applied before top-k) passes no gradient, as ReLU's backward does.
    Indices may repeat across columns (the main and AuxK selections concatenated); their gradients add up.
    """
    return GatherPreActs.apply(x_in, W_enc, b_enc, indices, values, kernels)
