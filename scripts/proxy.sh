#!/bin/bash
# Proxy measurements on a GPU machine (protocols in ../shared/PROXY.md). Source this file, then call
#   setup_data                         unpack .data/ (sp8192 train shards and val, both tokenizers) into
#                                      /tmp/sp8192, and re-encode the same text with sp1024 into /tmp/enwiki
#   p360 GPU RUN_ID [VAR=VALUE...]     quality: 360 s of training at the competition batch (786,432 tokens/step)
#   p150 GPU RUN_ID [VAR=VALUE...]     the same at 150 s and 131,072 tokens/step (a short horizon)
#   s786 GPU RUN_ID [VAR=VALUE...]     throughput: 40 steps at the competition shape, no evaluation to speak of
#   again GPU RUN_ID CKPT [VAR=...]    export a saved checkpoint again (scripts/evaluate.py) and evaluate it, TTT off:
#                                      export variants on the same trained weights
#   rescore GPU RUN_ID PTZ [VAR=...]   score a saved artifact again (scripts/evaluate.py): evaluation variants (TTT,
#                                      context) on the same artifact
#   timing GPU RUN_ID PTZ [VAR=...]    time the evaluation passes on documents as long as FineWeb's
#                                      (scripts/eval_timing.py; TARGETS=N scores the first N targets only;
#                                      PROFILE=1 adds the LoRA pass's operator table)
# VOCAB_SIZE=1024 among the VAR=VALUE pairs selects the sp1024 data (the script's default is 8192). Each run writes logs/RUN_ID.{txt,json}, which
# are then packed into $OUT/logs.tgz (when $OUT is set). A run is stopped after $LIMIT seconds (default 590), and
# killed 15 s later if it has not left by then (a stuck exit would otherwise hold the rest of the call).
# SCRIPT=other.py runs another revision of the script, for an A/B of two revisions.
export PYTHONUNBUFFERED=1
mkdir -p logs /tmp/ckpt && touch /tmp/proxy.start

setup_data() {
    mkdir -p /tmp/sp8192 /tmp/enwiki
    for f in .data/fineweb_*.bin.xz; do xz -dc "$f" > "/tmp/sp8192/$(basename "$f" .xz)" & done
    wait
    cp .data/fineweb_8192_bpe.model /tmp/sp8192/ && cp .data/fineweb_1024_bpe.model /tmp/enwiki/
    for split in train val; do
        python3 scripts/retokenize.py /tmp/sp8192 /tmp/sp8192/fineweb_8192_bpe.model /tmp/enwiki \
            /tmp/enwiki/fineweb_1024_bpe.model --split $split
    done
}

_data_for() {  # DATA_PATH and TOKENIZER_PATH for the VOCAB_SIZE among the arguments (8192 unless given)
    local vocab=8192 a
    for a in "$@"; do case "$a" in VOCAB_SIZE=*) vocab=${a#VOCAB_SIZE=};; esac; done
    if [ "$vocab" = 8192 ]; then echo "DATA_PATH=/tmp/sp8192 TOKENIZER_PATH=/tmp/sp8192/fineweb_8192_bpe.model"
    else echo "DATA_PATH=/tmp/enwiki TOKENIZER_PATH=/tmp/enwiki/fineweb_1024_bpe.model"; fi
}

_run() {  # GPU RUN_ID VAR=VALUE...: one run under the time limit, then its logs into $OUT/logs.tgz
    local gpu=$1 run_id=$2; shift 2
    env CUDA_VISIBLE_DEVICES="$gpu" RUN_ID="$run_id" ARTIFACT_PATH="/tmp/$run_id.ptz" \
        CHECKPOINT_PATH="/tmp/ckpt/$run_id.pt" $(_data_for "$@") "$@" \
        timeout -k 15 "${LIMIT:-590}" python3 ${PROGRAM:-${SCRIPT:-train_gpt.py}} > "/tmp/$run_id.out" 2>&1
    echo "$run_id exit $? $(grep -h '^submission_facts\|^ERROR' "logs/$run_id.txt" 2>/dev/null | cut -c1-200)"
    if [ -n "$OUT" ]; then  # every log written since this file was sourced
        (flock 9; find logs -newer /tmp/proxy.start -type f | tar czf "$OUT/logs.tgz" -T -) 9>/tmp/out.lock
    fi
}

# p360 and p150 run without TTT (its ~320 s on one GPU would not fit the call); `rescore` adds it on the artifact.
p360() { local gpu=$1 id=$2; shift 2; _run "$gpu" "$id" MAX_WALLCLOCK_SECONDS=360 TRAIN_BATCH_TOKENS=786432 \
    TRAIN_SEQ_LEN=2048 TTT_MODE=off "$@"; }
p150() { local gpu=$1 id=$2; shift 2; _run "$gpu" "$id" MAX_WALLCLOCK_SECONDS=150 TRAIN_BATCH_TOKENS=131072 \
    TRAIN_SEQ_LEN=2048 TTT_MODE=off "$@"; }
# s786 names no TTT knob, so that an older revision (SCRIPT=...) takes the same command; its eval (TTT included) is
# on 131K tokens only.
s786() { local gpu=$1 id=$2; shift 2; _run "$gpu" "$id" ITERATIONS=40 WARMUP_STEPS=3 MAX_WALLCLOCK_SECONDS=0 \
    TRAIN_BATCH_TOKENS=786432 TRAIN_SEQ_LEN=2048 TRAIN_LOG_EVERY=10 VAL_MAX_TOKENS=131072 EVAL_STRIDE=0 \
    CHECKPOINT_PATH= "$@"; }
again() { local gpu=$1 id=$2 ckpt=$3; shift 3  # export variants: scored without TTT unless asked (TTT_MODE=lora)
    PROGRAM="scripts/evaluate.py --checkpoint $ckpt --script ${SCRIPT:-train_gpt.py}" _run "$gpu" "$id" TTT_MODE=off "$@"; }
rescore() { local gpu=$1 id=$2 artifact=$3; shift 3
    PROGRAM="scripts/evaluate.py --artifact $artifact --script ${SCRIPT:-train_gpt.py}" _run "$gpu" "$id" "$@"; }
timing() { local gpu=$1 id=$2 artifact=$3; shift 3
    PROGRAM="scripts/eval_timing.py --artifact $artifact --targets ${TARGETS:-0} ${PROFILE:+--profile} --script ${SCRIPT:-train_gpt.py}" \
        _run "$gpu" "$id" "$@"; }
