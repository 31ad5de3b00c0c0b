#!/usr/bin/env bash
# Long context on one GPU: Llama-3.1-8B (dummy weights) at 128k and 1M tokens, HiP with the KV cache
# in pinned host memory (16-bit or 4-bit) against full attention with its cache on the GPU.
#
#   experiments/long_context.sh OUT CASE [CASE ...]
#
# Each case is one `offload-engine run` writing OUT/CASE.json (self-describing: hardware, commit,
# command, the plan, throughput, HiP's hit rate and the bytes it fetched per step); its output goes
# to OUT/CASE.log. Cases:
#   hip-128k          HiP, batch 1, 128,000 + 64 tokens, cache in host memory
#   hip-128k-profile  the same, 24 tokens, with --profile (the decode step's split by category)
#   hip4-128k-b8      HiP, batch 8, 4-bit host cache, hidden states in host memory
#   hip4-128k-bk4-b12 the same with key blocks of 4 (half the GPU's block-start keys): batch 12
#   full-128k-b3      full attention, batch 3 (the largest that fits), cache on the GPU
#   hip-128k-512      HiP, batch 1, 128,000 + 512 (FlexGen's throughput definition over a long decode)
#   hip4-1m           HiP, batch 1, 1,000,000 + 16 tokens, 4-bit host cache (--max-positions)
# `--dry-run` before every case prints its plan first (free: nothing is allocated).
set -uo pipefail
out=$1; shift
mkdir -p "$out"
common=(--model llama-3.1-8b --dtype float16 --seed 0)
host_kv=(--percent 100 0 0 100 100 0 --kv-policy hip)
flags_for() {
    case $1 in
        hip-128k) echo "${host_kv[*]} --prompt-len 128000 --gen-len 64 --gpu-batch-size 1" ;;
        hip-128k-profile) echo "${host_kv[*]} --prompt-len 128000 --gen-len 24 --gpu-batch-size 1 --profile" ;;
        hip4-128k-b8) echo "--percent 100 0 0 100 0 100 --kv-policy hip --compress-cache --prompt-len 128000 \
--gen-len 32 --gpu-batch-size 8" ;;
        hip4-128k-bk4-b12) echo "--percent 100 0 0 100 0 100 --kv-policy hip --hip-block-k 4 --compress-cache \
--prompt-len 128000 --gen-len 32 --gpu-batch-size 12" ;;
        full-128k-b3) echo "--percent 100 0 100 0 100 0 --prompt-len 128000 --gen-len 32 --gpu-batch-size 3" ;;
        hip-128k-512) echo "${host_kv[*]} --prompt-len 128000 --gen-len 512 --gpu-batch-size 1" ;;
        hip4-1m) echo "--percent 100 0 0 100 0 100 --kv-policy hip --compress-cache --max-positions 1048576 \
--prompt-len 1000000 --gen-len 16 --gpu-batch-size 1" ;;
        *) echo "unknown case $1" >&2; return 1 ;;
    esac
}
for name in "$@"; do
    flags=$(flags_for "$name") || exit 2
    # shellcheck disable=SC2086
    python -m offload_engine run "${common[@]}" $flags --dry-run > "$out/$name.log" 2>&1
    start=$(date +%s)
    # shellcheck disable=SC2086
    python -m offload_engine run "${common[@]}" $flags --quiet --json "$out/$name.json" >> "$out/$name.log" 2>&1
    echo "$name: exit $? in $(( $(date +%s) - start )) s" | tee -a "$out/$name.log"
    grep -E "throughput|latency|hit rate|busy time|error" "$out/$name.log"
done
