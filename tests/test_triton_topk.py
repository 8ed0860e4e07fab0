"""The Triton kernels of the sparse step against their PyTorch reference (on the CPU in Triton's interpreter)."""

import os
import subprocess
import sys

import pytest
import torch

from pipeline import sparse_topk
from pipeline.sae import SAEConfig, TopKSAE

triton_topk = pytest.importorskip("pipeline.triton_topk", reason="needs the triton package")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sparse_inputs(batch: int, m: int, n_latents: int, d: int, dtype: torch.dtype, seed: int = 0):
    """indices: [batch, m] with repeats inside rows and latents never picked, weights: [batch, m], a table:
    [n_latents, d] and rows: [batch, d]."""
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, n_latents // 2, (batch, m), generator=generator)  # the upper half never picked
    indices[:, -1] = indices[:, 0]
    weights = torch.randn(batch, m, generator=generator)
    table = torch.randn(n_latents, d, generator=generator)
    rows = torch.randn(batch, d, generator=generator)
    return [t.to(DEVICE) for t in (indices, weights.to(dtype), table.to(dtype), rows.to(dtype))]


# (batch, m, n_latents, d): m and d below, at and past one block (BLOCK_M 32, BLOCK_D 128)
SHAPES = [(5, 3, 16, 8), (7, 32, 64, 128), (6, 45, 96, 200)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernels_match_the_pytorch_products(dtype, shape):
    batch, m, n_latents, d = shape
    indices, weights, table, rows = sparse_inputs(batch, m, n_latents, d, dtype)
    gathered = table[indices]  # [batch, m, d], the products written out
    torch.testing.assert_close(triton_topk.gather_sum(indices, weights, table),
                               sparse_topk.gather_sum(indices, weights, table))
    torch.testing.assert_close(triton_topk.gather_sum(indices, weights, table),
                               (weights[..., None] * gathered).sum(1))
    torch.testing.assert_close(triton_topk.gather_dot(indices, table, rows), (gathered * rows[:, None]).sum(-1))
    segments = triton_topk.segment_sum(indices, weights, rows, n_latents)
    torch.testing.assert_close(segments, sparse_topk.segment_sum(indices, weights, rows, n_latents))
    assert segments.shape == (n_latents, d) and not segments[n_latents // 2:].any()


def test_kernels_keep_bf16_tables_in_bf16_and_sum_in_float32():
    indices, weights, table, rows = sparse_inputs(4, 40, 64, 130, torch.bfloat16)
    out = triton_topk.gather_sum(indices, weights, table)
    assert out.dtype == torch.bfloat16
    exact = (weights.double()[..., None] * table.double()[indices]).sum(1)
    torch.testing.assert_close(out.double(), exact, rtol=1e-2, atol=1e-2)  # one rounding, not m of them


def test_empty_batches_give_empty_or_zero_results():
    indices, weights, table, rows = sparse_inputs(0, 8, 16, 8, torch.float32)
    assert triton_topk.gather_sum(indices, weights, table).shape == (0, 8)
    assert triton_topk.gather_dot(indices, table, rows).shape == (0, 8)
    segments = triton_topk.segment_sum(indices, weights, rows, 16)
    assert segments.shape == (16, 8) and not segments.any()


def test_triton_decode_matches_pytorch_decode_in_values_and_gradients():
    indices, weights, table, _ = sparse_inputs(9, 40, 64, 150, torch.float64)
    results = []
    for decode in (sparse_topk.decode, triton_topk.decode):
        values, W_dec = weights.clone().requires_grad_(), table.clone().requires_grad_()
        out = decode(values, indices, W_dec)
        (out * torch.linspace(-1, 1, 150, dtype=torch.float64, device=DEVICE)).sum().backward()
        results.append((out, values.grad, W_dec.grad))
    torch.testing.assert_close(results[1], results[0])


def test_triton_decode_passes_gradcheck():
    indices, weights, table, _ = sparse_inputs(3, 5, 12, 6, torch.float64)
    assert torch.autograd.gradcheck(lambda v, W: triton_topk.decode(v, indices, W),
                                    (weights.requires_grad_(), table.requires_grad_()))


def test_triton_gather_pre_acts_passes_gradcheck():
    indices, _, table, rows = sparse_inputs(4, 6, 12, 5, torch.float64)
    W_enc, x_in, b_enc = table.T.contiguous(), rows, torch.full((12,), 20.0, dtype=torch.float64, device=DEVICE)

    def pre_acts_at_indices(x_in, W_enc, b_enc):
        values = (x_in @ W_enc + b_enc).gather(1, indices).detach()
        assert values.min() > 1  # far from ReLU's kink, where finite differences jump
        return sparse_topk.gather_pre_acts(x_in, W_enc, b_enc, indices, values, triton_topk.KERNELS)

    assert torch.autograd.gradcheck(pre_acts_at_indices, tuple(t.requires_grad_() for t in (x_in, W_enc, b_enc)))


@pytest.mark.parametrize("n_dead", [0, 40])
def test_triton_step_gives_the_pytorch_sparse_step(n_dead):
    """decoder="triton" against decoder="sparse" on the same rows: reconstruction, AuxK and every gradient."""
    generator = torch.Generator().manual_seed(1)
    x, layer = torch.randn(48, 40, generator=generator), torch.randint(0, 3, (48,), generator=generator)
    dead_mask = (torch.arange(160) % 3 == 0) & (torch.arange(160) < 3 * n_dead)
    results = []
    for decoder in ("sparse", "triton"):
        torch.manual_seed(0)
        sae = TopKSAE(SAEConfig(d_model=40, n_layers=3, expansion=4, k=6, decoder=decoder)).to(DEVICE)
        assert sae.kernels is (triton_topk.KERNELS if decoder == "triton" else sparse_topk.TORCH_KERNELS)
        out = sae(x.to(DEVICE), layer.to(DEVICE), dead_mask.to(DEVICE))
        ((out.x_hat_normalized - out.x_normalized).pow(2).mean() + out.auxk_loss).backward()
        results.append((out.x_hat, out.auxk_loss, {name: p.grad for name, p in sae.named_parameters()}))
    assert (results[0][1] > 0) == (n_dead > 0)
    torch.testing.assert_close(results[1], results[0])


COMPILE_FOR_HOPPER = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from pipeline import triton_topk

INTS = {"indices": "*i64", "offsets": "*i64", "row_of_entry": "*i64", "m": "i32", "d": "i32"}
for name in ("_gather_sum_kernel", "_gather_dot_kernel", "_segment_sum_kernel"):
    kernel = getattr(triton_topk, name)
    for dtype in ("fp32", "fp64", "bf16"):
        constexprs = {"IS_FP64": dtype == "fp64", "BLOCK_M": triton_topk.BLOCK_M, "BLOCK_D": triton_topk.BLOCK_D}
        signature = {arg: INTS.get(arg, "*" + dtype) for arg in kernel.arg_names if arg not in constexprs}
        signature |= dict.fromkeys(constexprs, "constexpr")
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        assert triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["cubin"], (name, dtype)
"""


def test_kernels_compile_for_hopper_gpus():
    """The interpreter runs code the compiler may refuse: compile each kernel to an sm_90 cubin (no GPU needed)."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
