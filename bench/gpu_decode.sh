#!/usr/bin/env bash
# The decode benchmark on one CUDA GPU, in one go (a lent GPU machine's minutes are few):
#   bash bench/gpu_decode.sh OUT_DIR
# 1. bench.decode on Gemma 3 270M's shapes with random weights (the GGUF is not on such a
#    machine) at batch 1 and 8: jaxaccel float32 / bfloat16 / int8 against transformers eager
#    float32 / bfloat16 on the same GPU, MBU against the datasheet bandwidth;
# 2. the same at batch 1, bfloat16, with XLA's command buffers (CUDA graphs) also covering
#    while loops and conditionals, the decode loop's shape;
# 3. bench.decode on the ~56M random Llama;
# 4. the float32 parity tests against transformers with jax on the GPU (full-precision matmuls).
# Each step has its own time limit and a failure does not stop the next. Everything printed
# goes to OUT_DIR/log.txt; each benchmark's JSON to OUT_DIR/NAME.json.
set -uo pipefail
out=${1:?usage: bash bench/gpu_decode.sh OUT_DIR}
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

step gpu 30 nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv
step versions 60 "$py" -c "import jax, flax, torch, transformers; print('jax', jax.__version__, jax.devices(), \
'flax', flax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
step gemma 300 "$py" -m bench.decode --models gemma-random --batch 1,8 --bw-mib 4096 --out "$out/gemma.json"
XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL \
--xla_gpu_graph_min_graph_size=1" step gemma_cmdbuf 100 "$py" -m bench.decode --models gemma-random --batch 1 \
    --weights bfloat16 --torch-dtypes none --no-stream --bw-mib 4096 --out "$out/gemma_cmdbuf.json"
step random 100 "$py" -m bench.decode --models random --batch 1,8 --bw-mib 4096 --out "$out/random.json"
JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest step parity 80 "$py" -m pytest -q -x -p no:cacheprovider \
    tests/test_parity.py
