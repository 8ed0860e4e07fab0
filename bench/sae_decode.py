"""Rows/s of the dense and sparse SAE decoders, to set decoder="auto". Run: python -m bench.sae_decode"""

import time

import torch

from pipeline.sae import decode_dense, decode_sparse

D_MODEL, BATCH, REPEATS = 1536, 1024, 3
SHAPES = [(4, 32), (16, 64), (1, 64), (1, 128)]  # (expansion, k): the two defaults, then around the crossover


def rows_per_second(decode, values, indices, W_dec, backward: bool) -> float:
    """Best of REPEATS timed calls, after one warm-up call."""
    best = float("inf")
    for repeat in range(REPEATS + 1):
        start = time.perf_counter()
        out = decode(values, indices, W_dec)
        if backward:
            out.sum().backward()
        if repeat:
            best = min(best, time.perf_counter() - start)
    return BATCH / best


def main():
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, d_model {D_MODEL}, batch {BATCH}")
    print(f"{'expansion':>9} {'k':>4} {'pass':>17} {'dense rows/s':>13} {'sparse rows/s':>14}")
    for expansion, k in SHAPES:
        n_latents = expansion * D_MODEL
        W_dec = torch.randn(n_latents, D_MODEL, requires_grad=True)
        values = torch.rand(BATCH, k, requires_grad=True)
        indices = torch.rand(BATCH, n_latents).topk(k).indices
        for backward in (False, True):
            dense = rows_per_second(decode_dense, values, indices, W_dec, backward)
            sparse = rows_per_second(decode_sparse, values, indices, W_dec, backward)
            name = "forward+backward" if backward else "forward"
            print(f"{expansion:>9} {k:>4} {name:>17} {dense:>13,.0f} {sparse:>14,.0f}")


if __name__ == "__main__":
    main()
