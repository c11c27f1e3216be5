#!/bin/bash
# Proxy measurements on a GPU machine (protocols in the README): source this file, then call
#   setup_data                      unpack the enwiki shards in .data/ (xz) into /tmp/enwiki
#   s786 GPU RUN_ID [VAR=VALUE...]  throughput at the competition shape (40 steps, 786,432 tokens/step)
#   p150 GPU RUN_ID [VAR=VALUE...]  quality at 150 s of training on one GPU (131,072 tokens/step)
#   p400 GPU RUN_ID [VAR=VALUE...]  the same at 400 s; with a cold compile it needs ~9.5 of a call's 10 minutes,
#                                   so run it as a pair with nothing else on the host
# Each run writes logs/RUN_ID.txt and logs/RUN_ID.json; VAR=VALUE pairs select the variant. A run is stopped after
# $LIMIT seconds (default 590), so a call with several runs always ends inside its time. SCRIPT=other.py runs another
# version of the script (an A/B of two revisions side by side); its logs land in logs/ as usual.
export PYTHONUNBUFFERED=1 DATA_PATH=/tmp/enwiki TOKENIZER_PATH=/tmp/enwiki/fineweb_1024_bpe.model

setup_data() {  # .data/ holds fineweb_{train,val}_*.bin.xz shards and fineweb_1024_bpe.model
    mkdir -p /tmp/enwiki
    for f in .data/*.bin.xz; do xz -dc "$f" > "/tmp/enwiki/$(basename "$f" .xz)" & done
    wait
    cp .data/*.model /tmp/enwiki/
}

s786() {
    local gpu=$1 run_id=$2; shift 2
    env CUDA_VISIBLE_DEVICES="$gpu" RUN_ID="$run_id" ARTIFACT_PATH="/tmp/$run_id.ptz" ITERATIONS=40 WARMUP_STEPS=3 \
        MAX_WALLCLOCK_SECONDS=0 TRAIN_BATCH_TOKENS=786432 TRAIN_SEQ_LEN=2048 TRAIN_LOG_EVERY=10 \
        VAL_MAX_TOKENS=131072 EVAL_STRIDE=0 "$@" timeout "${LIMIT:-590}" python3 "${SCRIPT:-train_gpt.py}" > "/tmp/$run_id.out" 2>&1
}

p150() {
    local gpu=$1 run_id=$2; shift 2
    env CUDA_VISIBLE_DEVICES="$gpu" RUN_ID="$run_id" ARTIFACT_PATH="/tmp/$run_id.ptz" MAX_WALLCLOCK_SECONDS=150 \
        TRAIN_BATCH_TOKENS=131072 TRAIN_SEQ_LEN=2048 "$@" timeout "${LIMIT:-590}" python3 "${SCRIPT:-train_gpt.py}" > "/tmp/$run_id.out" 2>&1
}

p400() {
    local gpu=$1 run_id=$2; shift 2
    p150 "$gpu" "$run_id" MAX_WALLCLOCK_SECONDS=400 "$@"
}
