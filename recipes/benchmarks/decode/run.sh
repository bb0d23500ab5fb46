#!/usr/bin/env bash
# Decode benchmark: greedy, our beam search and pyctcdecode on the same log-probs, same LM,
# same beam width and pruning; speed, real-time factor, WER and CER in one markdown table.
#
#   bash recipes/benchmarks/decode/run.sh [bench.py options]     (see --help)
#   e.g. bash recipes/benchmarks/decode/run.sh --lm lm3.arpa --manifest data/synthetic/test.jsonl
#
# The first run installs pyctcdecode and the kenlm Python module into the venv (kenlm builds
# from source: a C++ compiler, cmake and Boost headers are needed; KENLM_SRC=path/to/kenlm.tar.gz
# builds a local copy); later runs skip that. Everything runs under `nice -n 19`.
set -euo pipefail
cd "$(dirname "$0")/../../.."

python=.venv/bin/python
[ -x "$python" ] || python=python

if ! "$python" -c "import pyctcdecode, kenlm" 2>/dev/null; then
  echo "== installing the comparison decoder (pyctcdecode + kenlm) into $("$python" -c 'import sys; print(sys.prefix)')"
  # pyctcdecode pins numpy<2 but runs on numpy 2: install it without its pins, and its one
  # other need (pygtrie) by hand, so that pip leaves our numpy alone.
  nice -n 19 "$python" -m pip install --no-deps "pyctcdecode==0.5.0"  # bench.py reads its 0.5 source
  nice -n 19 "$python" -m pip install pygtrie
  # kenlm has no wheels on PyPI: pip builds its sdist (about a minute on 2 cores), or the source
  # tarball named by KENLM_SRC, for a machine without the network.
  nice -n 19 "$python" -m pip install "${KENLM_SRC:-kenlm}"
  "$python" -c "import pyctcdecode, kenlm"
fi

exec nice -n 19 "$python" recipes/benchmarks/decode/bench.py "$@"
