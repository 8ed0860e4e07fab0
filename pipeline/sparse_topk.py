"""The encoder's gradient through top-k, taken only at the kept latents: O(batch * k * d_model) per step.

Autograd would differentiate the dense `x_in @ W_enc` densely, although top-k leaves k nonzeros per row of
its gradient; here the pre-activations come from that dense product computed without grad, and the
backward gathers and scatters the k kept columns of W_enc. Plain PyTorch ops, so CPU and CUDA alike.
"""

import torch
import torch.nn.functional as F


def sum_rows_by_latent(indices: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor, n_latents: int):
    """out[n] = sum of weights[b, j] * rows[b] over the (b, j) with indices[b, j] == n; out: [n_latents, d].

    indices, weights: [batch, m]; rows: [batch, d]. Sorting the entries by latent makes each latent one bag
    of F.embedding_bag, which sums them without building the [batch * m, d] products.
    """
    flat = indices.flatten()
    order = flat.argsort(stable=True)  # on the CPU also the faster one, and it fixes each latent's summation order
    counts = torch.bincount(flat, minlength=n_latents)
    offsets = counts.cumsum(0) - counts  # where each latent's entries start in the sorted order
    row_of_entry = order.div(indices.shape[1], rounding_mode="floor")
    return F.embedding_bag(row_of_entry, rows, offsets, per_sample_weights=weights.flatten()[order], mode="sum")


class GatherPreActs(torch.autograd.Function):
    """values at indices of relu(x_in @ W_enc + b_enc), with the gradient of only those entries."""

    @staticmethod
    def forward(ctx, x_in, W_enc, b_enc, indices, values):
        ctx.save_for_backward(x_in, W_enc, indices, values)
        ctx.b_enc_dtype = b_enc.dtype
        return values.clone()  # a new tensor: autograd must not rewrite the caller's values

    @staticmethod
    def backward(ctx, grad_values):
        x_in, W_enc, indices, values = ctx.saved_tensors
        n_latents = W_enc.shape[1]
        grad = (grad_values * (values > 0)).to(W_enc.dtype)  # [batch, m]; ReLU passes no gradient at 0
        grad_x_in = grad_W_enc = grad_b_enc = None
        if ctx.needs_input_grad[0]:
            W_rows = W_enc.T.contiguous()  # [n_latents, d_model]; free when W_enc is stored column-major
            grad_x_in = F.embedding_bag(indices, W_rows, per_sample_weights=grad, mode="sum").to(x_in.dtype)
        if ctx.needs_input_grad[1]:
            grad_W_enc = sum_rows_by_latent(indices, grad, x_in.to(W_enc.dtype), n_latents).T
        if ctx.needs_input_grad[2]:
            grad_b_enc = grad.new_zeros(n_latents, dtype=ctx.b_enc_dtype).index_add_(
                0, indices.flatten(), grad.flatten().to(ctx.b_enc_dtype)
            )
        return grad_x_in, grad_W_enc, grad_b_enc, None, None


def gather_pre_acts(
    x_in: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, indices: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """values: [batch, m], the ReLU'd pre-acts at indices: [batch, m], already computed without grad, now with
    gradients for x_in: [batch, d_model], W_enc: [d_model, n_latents] and b_enc: [n_latents].

    A value of 0 (cut by ReLU, or by a mask applied before top-k) passes no gradient, as ReLU's backward does.
    Indices may repeat across columns (the main and AuxK selections concatenated); their gradients add up.
    """
    return GatherPreActs.apply(x_in, W_enc, b_enc, indices, values)
