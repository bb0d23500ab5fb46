#!/usr/bin/env bash
# The main job on the offline synthetic corpus: build it, train on CPU (or GPU), score, transcribe.
#
#   bash recipes/demo/run.sh [--stage N] [--stop-stage N] [--set key=value ...]
#
# Stages (each restartable; finished work is skipped):
#   1  speak the corpus with espeak-ng/flite and write train/dev/test manifests
#   2  train (resumes from exp/demo/last.pt)
#   3  a 3-gram LM from the corpus's text-only share (no dev/test sentence in it)
#   4  WER/CER tables for dev and test: greedy, then beam search with the LM; error reports
#   5  transcribe one test file, with word timestamps as subtitles, and draw its alignment
#
# What to look at afterwards, in exp/demo/: curves.png (learning curves; or
# `tensorboard --logdir exp/demo`), {dev,test}.report.md (error reports), align.png (what the
# model hears in the transcribed file), RESULTS.md and RESULTS.beam_lm.md.
set -euo pipefail
cd "$(dirname "$0")/../.."

stage=1
stop_stage=5
data=data/synthetic
exp=exp/demo
conf=recipes/demo/conf.yaml
overrides=()
while [ $# -gt 0 ]; do
  case "$1" in
    --stage) stage=$2; shift 2 ;;
    --stop-stage) stop_stage=$2; shift 2 ;;
    --data-dir) data=$2; shift 2 ;;
    --exp-dir) exp=$2; shift 2 ;;
    --set) overrides+=(--set "$2"); shift 2 ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "run.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
asr=".venv/bin/asr"
[ -x "$asr" ] || asr=asr

if [ "$stage" -le 1 ] && [ "$stop_stage" -ge 1 ]; then
  echo "== stage 1: synthetic corpus -> $data"
  # 800 voices x 40 sentences = 19.6 h: more voices and sentences beat more epochs (see conf.yaml).
  "$asr" prepare synthetic --out "$data" --train-speakers 800 --train-utts 40 \
    --eval-speakers 40 --eval-utts 5 --max-words 16 --seed 0
fi

if [ "$stage" -le 2 ] && [ "$stop_stage" -ge 2 ]; then
  echo "== stage 2: train -> $exp"
  "$asr" train --config "$conf" --train "$data/train.jsonl" --dev "$data/dev.jsonl" \
    --exp-dir "$exp" "${overrides[@]}"
fi

if [ "$stage" -le 3 ] && [ "$stop_stage" -ge 3 ]; then
  echo "== stage 3: language model -> $exp/lm/3gram.arpa"
  [ -f "$exp/lm/3gram.arpa" ] || "$asr" lm build "$data/lm/text.txt" -o "$exp/lm/3gram.arpa" --order 3
fi

if [ "$stage" -le 4 ] && [ "$stop_stage" -ge 4 ]; then
  echo "== stage 4: score (greedy)"
  "$asr" evaluate --model "$exp/best.pt" --manifest "$data/dev.jsonl" "$data/test.jsonl" \
    --results "$exp/RESULTS.md"
  echo "== stage 4: score (beam search + 3-gram LM)"
  "$asr" evaluate --model "$exp/best.pt" --manifest "$data/dev.jsonl" "$data/test.jsonl" \
    --lm "$exp/lm/3gram.arpa" --report-dir "$exp/beam_lm" --results "$exp/RESULTS.beam_lm.md"
fi

if [ "$stage" -le 5 ] && [ "$stop_stage" -ge 5 ]; then
  echo "== stage 5: transcribe one test file"
  wav=$(head -n 1 "$data/test.jsonl" | sed -E 's/.*"audio": "([^"]*)".*/\1/')
  [ "${wav#/}" != "$wav" ] || wav="$data/$wav"
  echo "reference:  $(head -n 1 "$data/test.jsonl" | sed -E 's/.*"text": "([^"]*)".*/\1/')"
  "$asr" transcribe --model "$exp/best.pt" "$wav"
  "$asr" transcribe --model "$exp/best.pt" --lm "$exp/lm/3gram.arpa" --format srt "$wav"
  "$asr" align --model "$exp/best.pt" "$wav" -o "$exp/align.png" >/dev/null
  echo "pictures: $exp/curves.png (learning curves), $exp/align.png (what the model hears);" \
    "error reports: $exp/dev.report.md, $exp/test.report.md"
fi
