#!/usr/bin/env bash
# LibriSpeech (any subsets) by stages: download, manifests, train, score.
#
#   bash recipes/librispeech/run.sh [--stage N] [--stop-stage N] [options] [--set key=value ...]
#
# Stages (each restartable; finished work is skipped):
#   1  download, verify (md5) and extract the subsets from OpenSLR or --mirror
#      (skipped with --corpus-dir, a LibriSpeech/ folder you already have)
#   2  manifests: DATA_DIR/manifests/<subset>.jsonl, with a report of what was left out
#   3  feature statistics (log-mel mean/std) of the training set: EXP_DIR/feature_stats.pt
#   4  train BiLSTM-CTC (resumes from EXP_DIR/last.pt)
#   5  decode the dev and test sets (greedy) and score them: EXP_DIR/RESULTS.md; with --lm, also
#      tune the LM weight and word bonus on the dev set (saved in best.pt) and score beam search
#      with the LM: EXP_DIR/RESULTS.beam_lm.md
#
# Options:
#   --data-dir DIR       archives, the extracted LibriSpeech/ tree, manifests (default data/librispeech)
#   --exp-dir DIR        model files, logs, RESULTS.md (default exp/librispeech/<conf name>)
#   --corpus-dir DIR     a LibriSpeech/ folder you already have: no download
#   --mirror URL         base URL holding <resource number>/<archive> (default OpenSLR)
#   --checksums FILE     '<md5 or sha256>  <archive>' lines to verify against instead
#   --train-set NAME     default train-clean-100
#   --dev-set NAME       default dev-clean
#   --test-sets "A B"    default "test-clean test-other"
#   --conf FILE          default recipes/librispeech/conf/clean100.yaml (also mini.yaml, 960.yaml)
#   --lm LM              an ARPA file for beam search, or the name of an OpenSLR SLR11 file that
#                        stage 1 fetches into DATA_DIR/lm/, e.g. 3-gram.pruned.1e-7.arpa.gz
#   --set key=value      config override, repeatable, e.g. --set "data.speeds=[0.9,1.0,1.1]"
#
# Mini LibriSpeech on a small machine:
#   bash recipes/librispeech/run.sh --conf recipes/librispeech/conf/mini.yaml \
#     --train-set train-clean-5 --dev-set dev-clean-2 --test-sets dev-clean-2
set -euo pipefail
cd "$(dirname "$0")/../.."

stage=1
stop_stage=5
data=data/librispeech
exp=
corpus=
mirror=
checksums=
train_set=train-clean-100
dev_set=dev-clean
test_sets="test-clean test-other"
conf=recipes/librispeech/conf/clean100.yaml
lm=
overrides=()
while [ $# -gt 0 ]; do
  case "$1" in
    --stage) stage=$2; shift 2 ;;
    --stop-stage) stop_stage=$2; shift 2 ;;
    --data-dir) data=$2; shift 2 ;;
    --exp-dir) exp=$2; shift 2 ;;
    --corpus-dir) corpus=$2; shift 2 ;;
    --mirror) mirror=$2; shift 2 ;;
    --checksums) checksums=$2; shift 2 ;;
    --train-set) train_set=$2; shift 2 ;;
    --dev-set) dev_set=$2; shift 2 ;;
    --test-sets) test_sets=$2; shift 2 ;;
    --conf) conf=$2; shift 2 ;;
    --lm) lm=$2; shift 2 ;;
    --set) overrides+=(--set "$2"); shift 2 ;;
    -h|--help) sed -n '2,32p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "run.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -n "$exp" ] || exp=exp/librispeech/$(basename "$conf" .yaml)
asr=".venv/bin/asr"
[ -x "$asr" ] || asr=asr

# Every subset once, in order: train, dev, then the test sets.
subsets=$(printf '%s\n' "$train_set" "$dev_set" $test_sets | awk '!seen[$0]++' | tr '\n' ' ')
manifests=$data/manifests
lm_resource=
if [ -n "$lm" ] && [ ! -f "$lm" ]; then  # not a file: an OpenSLR LM file for stage 1 to fetch
  lm_resource=$lm
  lm=$data/lm/$lm
fi

if [ "$stage" -le 1 ] && [ "$stop_stage" -ge 1 ]; then
  if [ -n "$corpus" ]; then
    echo "== stage 1: download skipped, reading $corpus"
  else
    echo "== stage 1: download and extract $subsets-> $data/LibriSpeech"
    fetch=(--download --data-dir "$data")
    [ -z "$mirror" ] || fetch+=(--mirror "$mirror")
    [ -z "$checksums" ] || fetch+=(--checksums "$checksums")
    # shellcheck disable=SC2086
    "$asr" prepare librispeech "${fetch[@]}" --splits $subsets
  fi
  if [ -n "$lm_resource" ]; then
    "$asr" prepare librispeech --download --data-dir "$data" --lm "$lm_resource" \
      ${mirror:+--mirror "$mirror"} ${checksums:+--checksums "$checksums"}
  fi
fi

if [ "$stage" -le 2 ] && [ "$stop_stage" -ge 2 ]; then
  echo "== stage 2: manifests -> $manifests"
  todo=""
  for s in $subsets; do
    [ -f "$manifests/$s.jsonl" ] || todo="$todo $s"
  done
  if [ -n "$todo" ]; then
    # shellcheck disable=SC2086
    "$asr" prepare librispeech --corpus-dir "${corpus:-$data/LibriSpeech}" --splits $todo --out "$manifests"
  else
    echo "all manifests present"
  fi
fi

train=("$asr" train --config "$conf" --train "$manifests/$train_set.jsonl" --dev "$manifests/$dev_set.jsonl"
       --exp-dir "$exp" "${overrides[@]}")

if [ "$stage" -le 3 ] && [ "$stop_stage" -ge 3 ]; then
  echo "== stage 3: feature statistics -> $exp/feature_stats.pt"
  if [ -f "$exp/feature_stats.pt" ]; then
    echo "already computed"
  else
    "${train[@]}" --stats-only
  fi
fi

if [ "$stage" -le 4 ] && [ "$stop_stage" -ge 4 ]; then
  echo "== stage 4: train -> $exp"
  "${train[@]}"
fi

if [ "$stage" -le 5 ] && [ "$stop_stage" -ge 5 ]; then
  echo "== stage 5: decode and score -> $exp/RESULTS.md"
  sets=()
  for s in $(printf '%s\n' "$dev_set" $test_sets | awk '!seen[$0]++'); do
    sets+=("$manifests/$s.jsonl")
  done
  "$asr" evaluate --model "$exp/best.pt" --manifest "${sets[@]}" --decoder greedy --results "$exp/RESULTS.md"
  if [ -n "$lm" ]; then
    echo "== stage 5: tune the LM weight and word bonus on $dev_set, then beam search + LM"
    "$asr" tune-lm --model "$exp/best.pt" --manifest "$manifests/$dev_set.jsonl" --lm "$lm" --save
    "$asr" evaluate --model "$exp/best.pt" --manifest "${sets[@]}" --report-dir "$exp/beam_lm" \
      --results "$exp/RESULTS.beam_lm.md"
  fi
fi
