"""Decode benchmark: greedy, our beam search and pyctcdecode, side by side on the same log-probs.

    manifest --load_audio--> waves --model (once)--> (T', V) log-probs per utterance
        --greedy / asr BeamSearchDecoder / pyctcdecode--> text --error_rates--> WER, CER

The acoustic model runs once; every decoder then reads the very same arrays, so the table
compares decoders and nothing else. Both beam searches get the same ARPA file, the same
vocabulary, beam width, per-frame token threshold (token_min_logp) and beam threshold
(beam_prune_logp), and the same LM weight and word bonus. Times are wall-clock seconds of
decoding only: building the decoders (reading the LM) and each one's first call (numba
compiles or loads our search then) are timed apart and reported below the table.

What cannot be made equal, because it is how each search works (read in pyctcdecode 0.5's
decoder.py and language_model.py):
  * A word still being spelled: we add lm_weight * (the best unigram ln P it can still become,
    or unk_logp if no LM word starts so); pyctcdecode adds 0 if some LM word starts so, else
    unk_score_offset (not scaled by alpha, and scaled up by len/6 past 6 letters).
  * A finished word the LM lacks: we score lm_weight * (back-offs + unk_logp), all natural log;
    pyctcdecode adds unk_score_offset to KenLM's log10 P(<unk> | context) *before* converting
    to natural log, so its default -10 costs alpha * (ln P(<unk> | context) - 23.0).
  * pyctcdecode's decode() drops beams whose last n-1 words, partial word and last token equal
    a better beam's (prune_history=True); we keep every distinct prefix.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import inspect
import json
import multiprocessing
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from asr.audio import SAMPLE_RATE, load_audio
from asr.data import BucketBatchSampler, read_manifest
from asr.decode import DEFAULT_BEAM_SIZE, DEFAULT_LM_WEIGHT, DEFAULT_WORD_BONUS, BeamSearchDecoder, GreedyDecoder
from asr.lm import SPECIALS, read_arpa
from asr.metrics import error_rates
from asr.transcribe import load_model

# BeamSearchDecoder's own defaults, read from it so that they cannot drift: by default both
# searches prune as our users' decoder does.
_OURS = inspect.signature(BeamSearchDecoder).parameters
DEFAULT_TOKEN_MIN_LOGP = _OURS["token_min_logp"].default
DEFAULT_BEAM_PRUNE_LOGP = _OURS["beam_prune_logp"].default
DEFAULT_UNK_LOGP = _OURS["unk_logp"].default


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Speed (utterances/s, real-time factor) and accuracy (WER, CER) of greedy, asr's "
                    "beam search and pyctcdecode on the same log-probs, LM, beam width and pruning.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="exp/demo/best.pt", help="model file")
    p.add_argument("--manifest", default="data/synthetic/test.jsonl", help="utterances to decode (JSON Lines)")
    p.add_argument("--lm", default=None,
                   help="word n-gram LM (ARPA file) for both beam searches; without one, both search without an LM")
    p.add_argument("--beam-size", type=int, default=DEFAULT_BEAM_SIZE, help="beam width of both searches")
    p.add_argument("--lm-weight", type=float, default=DEFAULT_LM_WEIGHT,
                   help="alpha: multiplies the LM's natural-log probability (both searches)")
    p.add_argument("--word-bonus", type=float, default=None,
                   help=f"beta: added per word (both searches); default {DEFAULT_WORD_BONUS} with an LM, 0 without "
                        "(pyctcdecode adds no bonus when it has no LM)")
    p.add_argument("--token-min-logp", type=float, default=DEFAULT_TOKEN_MIN_LOGP,
                   help="per frame, tokens below this ln p are not tried (unless the frame's best)")
    p.add_argument("--beam-prune-logp", type=float, default=DEFAULT_BEAM_PRUNE_LOGP,
                   help="prefixes scoring this far below the best are dropped")
    p.add_argument("--unk-logp", type=float, default=DEFAULT_UNK_LOGP,
                   help="ours: ln P of a word the LM lacks (pyctcdecode: see --unk-score-offset)")
    p.add_argument("--unk-score-offset", type=float, default=-10.0,
                   help="pyctcdecode's OOV offset (its default); units differ from --unk-logp, see bench.py")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="threads (ours) and pool processes (pyctcdecode) of the parallel rows")
    p.add_argument("--limit", type=int, default=None, help="decode only the first N utterances of the manifest")
    p.add_argument("--repeats", type=int, default=3, help="time each decoder this many times and keep the fastest")
    p.add_argument("--batch-seconds", type=float, default=200.0, help="audio per acoustic-model batch")
    p.add_argument("--device", default="auto", help="where the acoustic model runs (decoding is on CPU)")
    p.add_argument("--out", default="recipes/benchmarks/decode/RESULTS.md",
                   help="markdown report; the hypotheses go beside it as <stem>.hyps.jsonl")
    return p.parse_args()


def machine() -> str:
    """CPU model, usable/total cores and the load when we start (a busy machine slows every row)."""
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{model}, {usable} of {os.cpu_count()} cores usable, load average {load} at start"


@dataclass
class Row:
    name: str
    parallel: str  # as the table says it
    single: bool  # one thread / one process: compared with the other single row
    seconds: float  # fastest of the repeats
    texts: list[str]


def timed(fn, repeats: int) -> tuple[list[str], float]:
    best, texts = float("inf"), []
    for _ in range(repeats):
        start = time.perf_counter()
        texts = fn()
        best = min(best, time.perf_counter() - start)
    return texts, best


def main() -> None:
    args = parse_args()
    if args.word_bonus is None:
        args.word_bonus = DEFAULT_WORD_BONUS if args.lm else 0.0
    rows = read_manifest(args.manifest)[: args.limit]
    if not rows:
        raise SystemExit(f"{args.manifest}: no utterances")
    started = dt.datetime.now().astimezone()

    # --- log-probs, once -------------------------------------------------------------------
    t = load_model(args.model, device=args.device)
    waves = [load_audio(r.audio) for r in rows]
    audio_seconds = sum(len(w) for w in waves) / SAMPLE_RATE
    log_probs: list[np.ndarray] = [np.empty(0)] * len(rows)  # (T', V) float32 each, manifest order
    batches = []  # (indices, (B, T', V) tensor, lengths) for the greedy decoder, which takes batches
    start = time.perf_counter()
    for idx in BucketBatchSampler([len(w) / SAMPLE_RATE for w in waves], args.batch_seconds).batches:
        lp, lengths = t.log_probs([waves[i] for i in idx])
        batches.append((idx, lp, lengths))
        for i, x, n in zip(idx, lp.numpy(), lengths.tolist()):
            log_probs[i] = np.ascontiguousarray(x[:n], dtype=np.float32)
    model_seconds = time.perf_counter() - start
    # From here on torch only runs the greedy argmax: keep it to the one thread its row claims.
    torch.set_num_threads(1)
    print(f"log-probs of {len(rows)} utterances ({audio_seconds:.0f} s of audio) in {model_seconds:.1f} s")

    # --- the decoders ----------------------------------------------------------------------
    greedy = GreedyDecoder(t.tokenizer)
    setup: dict[str, float] = {}
    start = time.perf_counter()
    ours = {n: BeamSearchDecoder(t.tokenizer, beam_size=args.beam_size, lm=args.lm, lm_weight=args.lm_weight,
                                 word_bonus=args.word_bonus, lexicon="free", unk_logp=args.unk_logp,
                                 token_min_logp=args.token_min_logp, beam_prune_logp=args.beam_prune_logp,
                                 num_workers=n)
            for n in (1, args.workers)}
    setup["ours: build the decoder (read the LM, make its tables)"] = (time.perf_counter() - start) / len(ours)
    # Ours and pyctcdecode spell any word by default; ours can also keep to the LM's words.
    in_lexicon = BeamSearchDecoder(t.tokenizer, beam_size=args.beam_size, lm=args.lm, lm_weight=args.lm_weight,
                                   word_bonus=args.word_bonus, lexicon="lm", unk_logp=args.unk_logp,
                                   token_min_logp=args.token_min_logp, beam_prune_logp=args.beam_prune_logp,
                                   num_workers=1) if args.lm else None

    from pyctcdecode import build_ctcdecoder

    # pyctcdecode's labels are ours with the blank spelled "" (it finds " " as the word boundary).
    labels = ["" if i == t.tokenizer.blank_id else tok for i, tok in enumerate(t.tokenizer.tokens)]
    # Its word list is given, not read by its own ARPA scanner (which skips unigrams that have no
    # back-off column), so both searches know exactly the LM words our decoder spells.
    arpa = read_arpa(args.lm) if args.lm else None
    unigrams = [w for (w,) in arpa.ngrams[0] if w not in SPECIALS] if arpa else None
    start = time.perf_counter()
    # alpha and beta mean what ours do: LanguageModel.score returns
    #   alpha * log10 P(word | state) * LOG_BASE_CHANGE_FACTOR + beta,  LOG_BASE_CHANGE_FACTOR = 1 / log10(e) = ln 10,
    # i.e. alpha * ln P + beta per word, and with lm_score_boundary=True (its default) a sentence
    # starts in <s> and ends with </s>, as ours does.
    theirs = build_ctcdecoder(labels, kenlm_model_path=args.lm, unigrams=unigrams, alpha=args.lm_weight,
                              beta=args.word_bonus, unk_score_offset=args.unk_score_offset)
    setup["pyctcdecode: build the decoder (kenlm reads the LM)"] = time.perf_counter() - start
    # Our three search settings under pyctcdecode's names.
    search = dict(beam_width=args.beam_size, token_min_logp=args.token_min_logp, beam_prune_logp=args.beam_prune_logp)

    # --- warm up: first calls, timed apart -------------------------------------------------
    first = min(range(len(rows)), key=lambda i: len(log_probs[i]))
    start = time.perf_counter()
    ours[1].decode_each([log_probs[first]])
    setup["ours: first call (numba compile or cache load)"] = time.perf_counter() - start
    start = time.perf_counter()
    theirs.decode(log_probs[first], **search)
    setup["pyctcdecode: first call"] = time.perf_counter() - start
    pool, notes = None, []
    if args.workers > 1:
        start = time.perf_counter()
        try:
            # fork (its decode_batch falls back to one process on spawn pools): the workers inherit the LM.
            pool = multiprocessing.get_context("fork").Pool(args.workers)
        except ValueError as e:  # no fork on this platform
            notes.append(f"pyctcdecode's pool row is missing: {e}")
        else:
            theirs.decode_batch(pool, [log_probs[first]] * args.workers, **search)
            setup[f"pyctcdecode: start a pool of {args.workers} and warm it"] = time.perf_counter() - start

    # --- timed runs ------------------------------------------------------------------------
    def run_greedy() -> list[str]:
        texts = [""] * len(rows)
        for idx, lp, lengths in batches:
            for i, text in zip(idx, greedy(lp, lengths)):
                texts[i] = text
        return texts

    lm_tag = "+ LM" if args.lm else "no LM"
    plan = [("greedy", "1 thread", True, run_greedy),
            (f"asr beam {lm_tag}", "1 thread", True, lambda: ours[1].decode_each(log_probs)),
            (f"pyctcdecode {lm_tag}", "1 process", True, lambda: [theirs.decode(x, **search) for x in log_probs])]
    if args.workers > 1:
        plan.append((f"asr beam {lm_tag}", f"{args.workers} threads", False,
                     lambda: ours[args.workers].decode_each(log_probs)))
    if pool is not None:
        plan.append((f"pyctcdecode {lm_tag}", f"pool of {args.workers}", False,
                     lambda: theirs.decode_batch(pool, log_probs, **search)))
    if in_lexicon is not None:
        in_lexicon.decode_each([log_probs[first]])
        plan.append(("asr beam + LM, LM words only", "1 thread", True, lambda: in_lexicon.decode_each(log_probs)))
    results = []
    for name, parallel, single, fn in plan:
        texts, seconds = timed(fn, args.repeats)
        results.append(Row(name, parallel, single, seconds, texts))
        print(f"{name}, {parallel}: {seconds:.2f} s")
    if pool is not None:
        pool.close()
        pool.join()

    # --- the report ------------------------------------------------------------------------
    ids, refs = [r.id for r in rows], [r.text for r in rows]
    rates = [error_rates(ids, refs, r.texts) for r in results]
    theirs_at = {r.single: (r, e) for r, e in zip(results, rates) if r.name.startswith("pyctcdecode")}
    lines = ["| decoder | parallel | utt/s | RTF | WER % | CER % | speed-up vs pyctcdecode | WER vs pyctcdecode |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r, e in zip(results, rates):
        speedup = delta = "—"
        if r.name.startswith("asr") and r.single in theirs_at:
            other, other_rates = theirs_at[r.single]
            speedup = f"{other.seconds / r.seconds:.1f}×"
            delta = f"{100 * (e.wer - other_rates.wer):+.2f} pts"
        lines.append(f"| {r.name} | {r.parallel} | {len(rows) / r.seconds:.3g} | {r.seconds / audio_seconds:.2g} "
                     f"| {100 * e.wer:.2f} | {100 * e.cer:.2f} | {speedup} | {delta} |")
    same = sum(a == b for a, b in zip(results[1].texts, results[2].texts))

    lm_line = f"`{args.lm}`" if args.lm else "none (both beams without an LM)"
    if arpa:
        n_grams = ", ".join(f"{len(g)} {n + 1}-grams" for n, g in enumerate(arpa.ngrams))
        lm_line += f" ({n_grams})"
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in ("pyctcdecode", "kenlm", "numba", "numpy"))
    report = "\n".join([
        "# Decode benchmark", "",
        f"- date: {started:%Y-%m-%d %H:%M %Z}",
        f"- machine: {machine()}",
        f"- manifest: `{args.manifest}`, {len(rows)} utterances, {audio_seconds:.1f} s of audio"
        + (f" (first {args.limit})" if args.limit else ""),
        f"- model: `{args.model}`; log-probs computed once on {t.device} in {model_seconds:.1f} s",
        f"- LM: {lm_line}",
        f"- settings: beam {args.beam_size}, lm_weight (alpha) {args.lm_weight}, word_bonus (beta) "
        f"{args.word_bonus}, token_min_logp {args.token_min_logp}, beam_prune_logp {args.beam_prune_logp}, "
        f"ours unk_logp {args.unk_logp}, pyctcdecode unk_score_offset {args.unk_score_offset}; "
        f"fastest of {args.repeats} run(s)",
        f"- versions: {versions}", "",
        *lines, "",
        "utt/s: utterances decoded per wall-clock second; RTF: decoding seconds per second of audio "
        "(acoustic model excluded); speed-up: pyctcdecode's time over ours at the same parallelism; "
        "WER vs pyctcdecode: ours minus theirs, in percentage points (negative: ours is better).",
        f"Single-thread hypotheses identical for {same} of {len(rows)} utterances."
        + (" alpha and beta are the same numbers for both, but each search scores partial and unknown "
           "words its own way (see bench.py's docstring), so settings tuned for one are not tuned for "
           "the other." if args.lm else ""),
        *notes, "",
        "Not in the timings (pyctcdecode is pure Python: its first call compiles nothing):", "",
        *[f"- {what}: {seconds:.2f} s" for what, seconds in setup.items()], "",
        f"Reproduce: `bash recipes/benchmarks/decode/run.sh {shlex.join(sys.argv[1:])}`", ""])
    print("\n" + report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report, encoding="utf-8")
    # The evidence behind the numbers: every hypothesis, one utterance a line.
    with open(out.with_suffix(".hyps.jsonl"), "w", encoding="utf-8") as f:
        for j, r in enumerate(rows):
            f.write(json.dumps({"id": r.id, "reference": r.text, "greedy": results[0].texts[j],
                                "asr_beam": results[1].texts[j], "pyctcdecode": results[2].texts[j]}) + "\n")
    print(f"wrote {out} and {out.with_suffix('.hyps.jsonl')}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
