#!/usr/bin/env bash
# The GPU figures of docs/BENCHMARKS.md in one run of under 10 minutes on one H100, each step's output
# also written to OUT_DIR/<step>.txt: the GPU-only tests (Triton kernels, CUDA graph replays, batches sent on a
# side stream), the SAE step (dense, sparse, Triton, each also replayed from CUDA graphs; Triton also with each
# step's metrics read before the next is queued; with and without dead latents; a profile), stage two from
# shards against memory (also with train-sae's default step on a GPU: dense, from CUDA graphs), stage two's host work
# alone (a stand-in step of a given time), and stage one
# against the bare forward pass of a 1.5B-shaped random-weight model, stage one's host work alone, and where its
# threads hold the GIL (py-spy). The step files end up in OUT_DIR/figures.tar.gz (a lent machine sends back 8 files).
# Usage: bash bench/gpu.sh OUT_DIR   (PYTHON picks the interpreter; default python3)
# Wheels in .whl (bench/gpu_wheels.sh fetches those a lent machine lacks) are installed first into a scratch folder.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: bash bench/gpu.sh OUT_DIR}"
python="${PYTHON:-python3}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the package, installed or not
if compgen -G ".whl/*.whl" >/dev/null; then
    site=$(mktemp -d)
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl \
        || { echo "cannot install the wheels in .whl" | tee "$out/machine.txt"; exit 1; }
    export PYTHONPATH="$PYTHONPATH:$site" PATH="$site/bin:$PATH"
fi
trap 'tar -czf "$out/figures.tar.gz" -C "$out" --remove-files $(cd "$out" && ls *.txt *.raw 2>/dev/null)' EXIT

deadline=${DEADLINE:-560}  # seconds from the start by which every step has ended: the device call's limit is 600
step() {  # step NAME SECONDS COMMAND...: run with a time limit, so that one hang leaves time for the rest
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    if ((SECONDS + limit > deadline)); then  # cut to what is left, since a bench prints its rows as it measures them
        limit=$((deadline - SECONDS))
        ((limit >= 15)) || { echo "== $name: skipped, $((deadline - SECONDS)) s left of $deadline" | tee "$out/$name.txt"; return; }
    fi
    echo "== $name (at most $limit s): $*"
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$out/$name.txt"  # -k: SIGKILL 10 s later if SIGTERM is not enough
    echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$out/$name.txt"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/machine.txt"
# every step needs these and a GPU: without them, stop now rather than fail seven times
"$python" -c "import torch, triton, transformers, zarr, numcodecs, google_crc32c
assert torch.cuda.is_available(), 'torch sees no CUDA GPU'
print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'zarr', zarr.__version__,
      'numcodecs', numcodecs.__version__)" 2>&1 | tee -a "$out/machine.txt" \
    || { echo "$python lacks a GPU or a package of this project (pip install -e '.[test]'); nothing measured" | tee -a "$out/machine.txt"; exit 1; }
# in order of what the performance issue needs most, should the machine's time run short
# the kernels' sm_90 compile test is for machines without a GPU: here the other tests compile and run them
step kernels 90 "$python" -m pytest -q -p no:cacheprovider tests/test_triton_topk.py tests/test_train_step.py \
    tests/test_loader.py::test_batches_sent_ahead_to_a_gpu_equal_the_cpu_batches \
    --deselect tests/test_triton_topk.py::test_kernels_compile_for_hopper_gpus
step cache 120 "$python" -m bench.cache_throughput --model random:qwen2.5-coder-1.5b --n-tokens 1M --batch-tokens 16384 \
    --max-seq-len 1024
step host 60 "$python" -m bench.stage_one_host --n-tokens 1M --repeats 1
# stage two's host alone: the loader feeding a stand-in step of the dense 4x/k32 step's time (graphs, no dead latent) and
# of the 3M rows/s target's
step train_host 60 "$python" -m bench.stage_two_host --synthetic-rows 1M --d-model 1536 --batch-size 4096 --steps 200 \
    --step-ms 2.5,1.37 --device cuda
step sae_step_profile 40 "$python" -m bench.sae_step --device cuda --batch-size 4096 --decoders dense,dense+graph,triton+graph \
    --repeats 1 --profile
step writer 40 "$python" -m bench.shard_writer --d-model 1536 --n-rows 512K --device cuda
if command -v py-spy >/dev/null; then  # which of stage one's threads holds the GIL, and what the main thread waits on
    step cache_gil 90 py-spy record --gil --threads --format raw -r 200 -o "$out/cache_gil.raw" -- "$python" -m bench.cache_throughput \
        --model random:qwen2.5-coder-1.5b --n-tokens 1M --batch-tokens 16384 --max-seq-len 1024 --repeats 1
    step cache_gil_threads 15 "$python" -m bench.thread_profile "$out/cache_gil.raw" --within _cache --top 15
    step cache_idle 90 py-spy record --idle --subprocesses --threads --format raw -r 100 -o "$out/cache_idle.raw" -- "$python" -m bench.cache_throughput \
        --model random:qwen2.5-coder-1.5b --n-tokens 1M --batch-tokens 16384 --max-seq-len 1024 --repeats 1
    step cache_idle_threads 15 "$python" -m bench.thread_profile "$out/cache_idle.raw" --within _cache --top 15
else
    echo "== no py-spy (bench/gpu_wheels.sh fetches its wheel): stage one's threads not profiled" | tee "$out/cache_gil_threads.txt"
fi
step train_graph 70 "$python" -m bench.train_throughput --synthetic-rows 1M --d-model 1536 --batch-size 4096 --steps 200 \
    --workers 8,14 --cuda-graph --repeats 2
paths=dense,sparse,triton,dense+graph,sparse+graph,triton+graph,triton+sync,triton+graph+sync
step sae_step 100 "$python" -m bench.sae_step --device cuda --batch-size 4096 --decoders $paths --steps 20
step train 100 "$python" -m bench.train_throughput --synthetic-rows 2M --d-model 1536 --batch-size 4096 --steps 200 \
    --workers 4,8,14
step sae_step_no_dead 50 "$python" -m bench.sae_step --device cuda --batch-size 4096 --decoders $paths --dead-fraction 0 --steps 20
