#!/usr/bin/env bash
# Training throughput benchmark: for the demo and LibriSpeech clean100 configs, audio seconds
# trained per wall second, FLOPs per audio second and utilisation of the device's peak, on CPU
# and on CUDA when present; the input pipeline alone against the model step alone (a starved GPU
# shows), and our pipeline against per-utterance librosa features. One markdown table, printed
# and written to RESULTS.md beside this script.
#
#   bash recipes/benchmarks/train_throughput/run.sh [bench.py options]     (see --help)
#   e.g. bash recipes/benchmarks/train_throughput/run.sh --device cuda --configs clean100
#        bash recipes/benchmarks/train_throughput/run.sh --manifest data/synthetic/train.jsonl --configs demo
#
# Nothing to install beyond the project's own dependencies (librosa is one). Everything runs
# under `nice -n 19`.
set -euo pipefail
cd "$(dirname "$0")/../../.."

python=.venv/bin/python
[ -x "$python" ] || python=python

exec nice -n 19 "$python" recipes/benchmarks/train_throughput/bench.py "$@"
