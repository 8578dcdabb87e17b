#!/usr/bin/env bash
# Is the engine's batch-1 decode step host-bound, and what removes the waiting? One H200:
#   bash bench/host_bound.sh [LAYERS]
# Runs bench/engine.py --batches 1 under variants (the paged attention kernel, the layer scan
# fully unrolled, XLA command buffers over the whole step) and prints per variant the step time,
# the host's dispatch time per call and its wait for the tokens.
set -u
layers=${1:-32}
keys='batch step_ms output_tokens_per_s dispatch_ms_per_call token_wait_ms_per_call unroll share_of_weights_kv_floor compile_s'
run() {
  name=$1; shift
  echo "== $name"
  timeout 240 python3 bench/engine.py --layers "$layers" --batches 1 --steps 48 "$@" 2>&1 \
    | python3 -c "
import json, sys
keys = '$keys'.split()
for line in sys.stdin:
    if line.startswith('{\"batch\"'):
        row = json.loads(line)
        print(json.dumps({'variant': '$name', **{k: row[k] for k in keys}}))
    elif 'Error' in line or 'error' in line:
        print(line.rstrip()[:300])
"
}
run default
run paged_pallas --set paged_attention_impl=pallas
run paged_pallas_unroll_all --set paged_attention_impl=pallas --unroll "$layers"
XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION,WHILE,CONDITIONAL" \
  run paged_pallas_unroll_all_graphs --set paged_attention_impl=pallas --unroll "$layers"
