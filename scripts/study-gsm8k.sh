#!/bin/sh
# The GSM8K generation study on the Qwen2.5-Coder pair (RESULTS.md, issue 22): ICL teacher and student,
# the student without context, SFT on references and the three distillation signals, each over the same
# seeds (seed s = the same demonstrations for the teacher, the ICL student and every distilled student)
# and the same seeded sample of test questions, then paired comparisons with `icld compare`.
#
# Resumable: a run whose results.json says "complete" is skipped; an interrupted one resumes (the run
# directory holds its identity; the teacher's off-policy pass is cached on disk). Sizes come from the
# environment so a GPU can run a larger version with the same script:
#   OUT (runs/study-gsm8k)  N (eval questions, 40)  TRAIN (training questions, 32)  STEPS (optimiser steps, 8)
#   SEEDS (0,1,2)  SHOTS (4)  TOKENS (max new tokens, 256)  DTYPE (fp32)  ICLD (icld)
set -eu
OUT=${OUT:-runs/study-gsm8k}
N=${N:-40}
TRAIN=${TRAIN:-32}
STEPS=${STEPS:-8}
SEEDS=${SEEDS:-0,1,2}
SHOTS=${SHOTS:-4}
TOKENS=${TOKENS:-256}
DTYPE=${DTYPE:-fp32}
ICLD=${ICLD:-icld}
TEACHER=qwen2.5-coder-1.5b
STUDENT=qwen2.5-coder-0.5b
COMMON="--task gsm8k --shots $SHOTS --limit $N --max-new-tokens $TOKENS --dtype $DTYPE --batch-size 16"

complete() { grep -qs '"status": "complete"' "$OUT/$1/results.json"; }

generate() {  # name model seeds [--no-context]
    complete "$1" && return 0
    $ICLD -q generate $COMMON --model "$2" --seeds "$3" ${4:-} --output-dir "$OUT/$1"
}

distill() {  # signal
    complete "distill-$1" && return 0
    $ICLD -q gen-distill $COMMON --teacher $TEACHER --student $STUDENT --signal "$1" --seeds "$SEEDS" \
        --train-queries "$TRAIN" --dev-queries 0 --eval-every -1 --select last --max-steps "$STEPS" \
        --train-batch-size 8 --lr 2e-4 --warmup-ratio 0.25 --peft lora --output-dir "$OUT/distill-$1"
}

mkdir -p "$OUT"
$ICLD models fetch $TEACHER $STUDENT
generate student-zero-shot $STUDENT 0 --no-context   # greedy without context: every seed would answer alike
generate icl-student $STUDENT "$SEEDS"
generate icl-teacher $TEACHER "$SEEDS"
distill reference                                     # SFT on the references: the labelled baseline
distill token                                         # runs the teacher's pass; sequence reads its answers
distill sequence
distill on-policy

for run in icl-teacher icl-student student-zero-shot distill-reference distill-token distill-sequence; do
    $ICLD compare "$OUT/distill-on-policy" "$OUT/$run" --json "$OUT/compare-on-policy-vs-$run.json"
done
for signal in token sequence reference; do
    for run in icl-teacher icl-student student-zero-shot; do
        $ICLD compare "$OUT/distill-$signal" "$OUT/$run" --json "$OUT/compare-$signal-vs-$run.json"
    done
done
$ICLD compare "$OUT/icl-teacher" "$OUT/icl-student" --json "$OUT/compare-icl-teacher-vs-icl-student.json"
