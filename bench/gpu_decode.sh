#!/usr/bin/env bash
# The decode benchmarks on one CUDA GPU, in one go (a lent GPU machine's minutes are few):
#   bash bench/gpu_decode.sh OUT_DIR [STEP ...]      (default: every step, in this order)
# gemma    bench.decode on Gemma 3 270M's shapes with random weights (the GGUF is not on such a
#          machine) at batch 1 and 8: jaxaccel float32 / bfloat16 / int8 against transformers
#          eager float32 / bfloat16 on the same GPU, MBU against the datasheet bandwidth
# profile  bench.profile_decode on the same model in bfloat16, batch 1: decode ms/step of a whole
#          generation, a streamed one and one program call per token, with XLA's defaults and
#          with other command-buffer (CUDA graph) / GEMM settings; a trace of the defaults
# random   bench.decode on the ~56M random Llama
# tests    parity and greedy-generation tests against transformers with jax on the GPU
#          (float32 models ask for float32 matmuls themselves: layers.float32_matmuls)
# Each step has its own time limit and a failure does not stop the next. Everything printed
# goes to OUT_DIR/log.txt; each benchmark's JSON to OUT_DIR/STEP.json.
set -uo pipefail
out=${1:?usage: bash bench/gpu_decode.sh OUT_DIR [gemma] [profile] [random] [tests]}
shift
steps=${*:-gemma profile random tests}
mkdir -p "$out"
log=$out/log.txt
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log it, report its exit status
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    echo "=== $name (limit ${limit}s): $*" | tee -a "$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    echo "=== $name rc=${PIPESTATUS[0]} in $((SECONDS - start))s" | tee -a "$log"
}

wants() { [[ " $steps " == *" $1 "* ]]; }

step gpu 30 nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv
if wants gemma; then
    step gemma 300 "$py" -m bench.decode --models gemma-random --batch 1,8 --bw-mib 4096 --out "$out/gemma.json"
fi
if wants profile; then
    graphs_all=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL
    step profile 200 "$py" -m bench.profile_decode --model gemma-random --weights bfloat16 --repeats 3 \
        --variant "no_graphs:xla_gpu_enable_command_buffer=" \
        --variant "graphs_with_loops:xla_gpu_enable_command_buffer=$graphs_all xla_gpu_graph_min_graph_size=1" \
        --variant "no_triton_gemm:xla_gpu_enable_triton_gemm=false" --out "$out/profile.json"
fi
if wants random; then
    step random 100 "$py" -m bench.decode --models random --batch 1,8 --bw-mib 4096 --out "$out/random.json"
fi
if wants tests; then
    JAX_PLATFORMS=cuda step tests 110 "$py" -m pytest -v -p no:cacheprovider \
        tests/test_engine.py tests/test_parity.py -k "greedy_equals or streaming_chunks or same_seed or \
sampling_frequencies or (prefill_then_decode and gemma3) or decode_rows or bfloat16_load"
fi
