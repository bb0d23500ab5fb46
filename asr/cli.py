"""The `asr` command: prepare, train, validate, transcribe, evaluate, align, lm, tune-lm.

The library raises; this module decides: it prints one line per bad input, goes on with the
others where that makes sense, and exits non-zero when anything failed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from asr.decode import DEFAULT_BEAM_SIZE, DEFAULT_LM_WEIGHT, DEFAULT_UNK_LOGP, DEFAULT_WORD_BONUS
from asr.errors import ASRError
from asr.transcribe import CHUNK_SECONDS, CONTEXT_SECONDS, TUNE_LM_WEIGHTS, TUNE_WORD_BONUSES

log = logging.getLogger("asr")

EPILOG_PREPARE = """examples:
  asr prepare synthetic --out data/synthetic
  asr prepare librispeech --corpus-dir ~/LibriSpeech --splits train-clean-100 dev-clean --out data/ls
  asr prepare librispeech --download --data-dir data/corpora --splits train-clean-5 dev-clean-2 --out data/mini
"""

EPILOG_TRANSCRIBE = """examples:
  asr transcribe --model exp/demo/best.pt a.wav b.flac
  asr transcribe --model exp/demo/best.pt --lm exp/demo/lm/3gram.arpa a.wav        # beam search + LM
  asr transcribe --model exp/demo/best.pt --timestamps a.wav                       # JSON with word times
  asr transcribe --model exp/demo/best.pt --format srt --output-dir subs/ *.flac   # subtitles
"""

EPILOG_LIBRISPEECH = """examples:
  # a tree you already have
  asr prepare librispeech --corpus-dir ~/LibriSpeech --splits train-clean-100 dev-clean --out data/ls
  # Mini LibriSpeech (about 450 MB), downloaded, verified and extracted to data/corpora/LibriSpeech/
  asr prepare librispeech --download --data-dir data/corpora --splits train-clean-5 dev-clean-2 --out data/mini
  # from a nearer mirror, with your own checksums (md5sum or sha256sum output)
  asr prepare librispeech --download --data-dir data/corpora --splits dev-clean --out data/ls \\
      --mirror https://openslr.elda.org/resources --checksums sums.txt

A download that stops (network, Ctrl-C) is resumed where it stopped by running the same command
again; subsets already extracted are skipped. The archives stay in DATA_DIR: delete them once
their subsets are extracted if you need the space.
"""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    try:
        return args.run(args)
    except ASRError as e:
        print(f"asr {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"asr {args.command}: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asr", description="Train and run BiLSTM-CTC speech recognisers: "
        "prepare data -> train -> transcribe / evaluate.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prepare", help="write manifests from a corpus",
                       description="Write JSON Lines manifests (id, audio, duration, text) from a corpus.",
                       epilog=EPILOG_PREPARE, formatter_class=argparse.RawDescriptionHelpFormatter)
    corpora = p.add_subparsers(dest="corpus", required=True, metavar="CORPUS")
    from data_prep.download import DEFAULT_MIRROR, LM_RESOURCES, SUBSETS

    ls = corpora.add_parser("librispeech", help="LibriSpeech: download it from OpenSLR, or use a tree you have",
                            description="Manifests from a LibriSpeech-layout tree "
                            "(<split>/<speaker>/<chapter>/*.flac + *.trans.txt):\none you already have "
                            "(--corpus-dir), or subsets downloaded from OpenSLR (--download),\neach "
                            "verified against its published md5 sum and extracted to "
                            "DATA_DIR/LibriSpeech/<subset>/.",
                            epilog=EPILOG_LIBRISPEECH, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = ls.add_mutually_exclusive_group(required=True)
    source.add_argument("--corpus-dir", type=Path,
                        help="folder holding the split folders (e.g. LibriSpeech/ with train-clean-100/ inside)")
    source.add_argument("--download", action="store_true",
                        help="first download, verify and extract the subsets missing under --data-dir")
    ls.add_argument("--data-dir", type=Path,
                    help="with --download: folder for the archives and the extracted LibriSpeech/ tree")
    ls.add_argument("--splits", nargs="+", default=[], metavar="SPLIT",
                    help="split folder names, e.g. train-clean-100 dev-clean; with --download one of: "
                    + " ".join(SUBSETS))
    ls.add_argument("--out", type=Path, help="folder for <split>.jsonl manifests (with --download it "
                    "may be left out: the subsets are then only downloaded and extracted)")
    ls.add_argument("--lm", nargs="+", default=[], metavar="FILE",
                    help="with --download: LM resources to fetch into DATA_DIR/lm/, any of: "
                    + " ".join(LM_RESOURCES))
    ls.add_argument("--mirror", metavar="URL",
                    help=f"with --download: base URL holding <resource number>/<archive> (default {DEFAULT_MIRROR})")
    ls.add_argument("--checksums", type=Path, metavar="FILE",
                    help="with --download: '<md5 or sha256>  <archive name>' lines (md5sum/sha256sum "
                    "output) to verify against instead of the published md5 sums")
    ls.set_defaults(run=_prepare_librispeech)
    syn = corpora.add_parser("synthetic", help="speak an offline corpus with espeak-ng, then write its manifests",
                             description="Build the offline synthetic corpus (LibriSpeech layout, spoken by "
                             "espeak-ng/flite) and write train/dev/test manifests beside it. The defaults are "
                             "the demo's corpus: 19.6 h of training speech, about 4 minutes on 2 cores.")
    syn.add_argument("--out", required=True, type=Path, help="corpus folder; manifests go to OUT/<split>.jsonl")
    syn.add_argument("--train-speakers", type=int, default=800, help="voices in train (default %(default)s)")
    syn.add_argument("--train-utts", type=int, default=40, help="utterances per train voice (default %(default)s)")
    syn.add_argument("--eval-speakers", type=int, default=40, help="voices in dev and in test each (default %(default)s)")
    syn.add_argument("--eval-utts", type=int, default=5, help="utterances per dev/test voice (default %(default)s)")
    syn.add_argument("--max-words", type=int, default=16, help="longest sentence in words (default %(default)s)")
    syn.add_argument("--lm-sentences", type=int, default=20000, help="sentences in the LM text (default %(default)s)")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--jobs", type=int, default=None, help="worker processes (default: all cores)")
    syn.set_defaults(run=_prepare_synthetic)

    p = sub.add_parser("train", help="train a model from manifests",
                       description="Train a BiLSTM-CTC model. Resumes from EXP_DIR/last.pt when it exists. "
                       "Writes EXP_DIR/feature_stats.pt first (reused when there), then best.pt (best dev CER), "
                       "last.pt (with training state), log.csv, train.log.",
                       epilog="example: asr train --config recipes/demo/conf.yaml --train data/train.jsonl "
                       "--dev data/dev.jsonl --exp-dir exp/run1 --set optim.lr=5e-4 --set epochs=20")
    p.add_argument("--config", type=Path, help="YAML file overriding the defaults (see asr/train.py TrainConfig)")
    p.add_argument("--train", required=True, type=Path, help="training manifest (JSON Lines)")
    p.add_argument("--dev", required=True, type=Path, help="dev manifest, scored every epoch")
    p.add_argument("--exp-dir", required=True, type=Path, help="experiment folder for model files and logs")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set model.hidden_size=320 (repeatable)")
    p.add_argument("--no-resume", action="store_true", help="start afresh even if EXP_DIR/last.pt exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--stats-only", action="store_true",
                   help="only compute the feature statistics into EXP_DIR/feature_stats.pt (training "
                   "then reads them from there); a recipe stage of its own")
    p.set_defaults(run=_train)

    p = sub.add_parser("validate", help="check manifests before training",
                       description="Check manifests as training will, without training: malformed lines, "
                       "missing fields, missing or empty audio, empty text, characters outside the "
                       "vocabulary, utterances longer than data.max_duration or too short for their text "
                       "(CTC needs an output frame per character). One line per problem, a summary per "
                       "manifest; exit status 1 if any row is unusable. asr train runs the same checks "
                       "and skips (data.bad_rows=skip) or stops (data.bad_rows=fail).",
                       epilog="example: asr validate data/ls/train-clean-100.jsonl data/ls/dev-clean.jsonl "
                       "--config recipes/librispeech/conf/clean100.yaml --decode-audio")
    p.add_argument("manifest", nargs="+", type=Path, help="manifests (JSON Lines)")
    p.add_argument("--config", type=Path, help="the training config whose limits apply (subsampling, "
                   "speeds, max_duration)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, as for asr train")
    p.add_argument("--decode-audio", action="store_true",
                   help="also open every audio file: catches truncated or undecodable files and durations "
                   "that disagree with the file (slower: reads each file's header and last sample)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_validate)

    p = sub.add_parser("transcribe", help="print the text of audio files",
                       description="Transcribe audio files (any format soundfile reads, any sample rate "
                       "and channel count): one line per file, '<file>\\t<text>'. A file that cannot be "
                       "read gets one error line on stderr; the others go on; exit status 1 if any failed.",
                       epilog=EPILOG_TRANSCRIBE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="model file (.pt) written by asr train")
    p.add_argument("audio", nargs="+", type=Path, help="audio files")
    p.add_argument("--timestamps", action="store_true",
                   help="also give each word's start and end (seconds), from the CTC alignment; "
                   "implies --format json unless another format is named")
    p.add_argument("--format", choices=("txt", "json", "srt", "vtt"),
                   help="txt: '<file>\\t<text>' (default); json: text and timed words, one object a "
                   "line; srt/vtt: subtitles")
    p.add_argument("--output-dir", type=Path,
                   help="write OUTPUT_DIR/<file stem>.<format> for each file instead of printing")
    p.add_argument("--chunk-seconds", type=float, default=CHUNK_SECONDS, metavar="S",
                   help=f"audio longer than S seconds is read a piece at a time and heard in windows of "
                   f"S seconds, each overlapping the next by {2 * CONTEXT_SECONDS:g} s ({CONTEXT_SECONDS:g} s "
                   f"of context either side of a cut, heard but not kept), so an hour takes no more "
                   f"memory than a minute; the text and timestamps run on across the windows. More than "
                   f"{2 * CONTEXT_SECONDS:g} (default %(default)g)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default %(default)s)")
    _add_decoding_options(p)
    p.set_defaults(run=_transcribe)

    p = sub.add_parser("evaluate", help="WER/CER of a model on manifests",
                       description="Decode manifests and score them: corpus WER and CER after text "
                       "normalisation, printed as a table, and per manifest, in the report folder: "
                       "<manifest>.errors.jsonl (every utterance's id, reference, hypothesis and errors, "
                       "worst first) and an error report, <manifest>.report.md for people and "
                       "<manifest>.report.json for tools (substitutions, deletions and insertions of words "
                       "and characters, the most frequent confusions, WER by speaker and by duration, "
                       "every utterance's aligned reference and hypothesis).")
    p.add_argument("--model", required=True, type=Path, help="model file (.pt)")
    p.add_argument("--manifest", required=True, type=Path, nargs="+", help="manifest(s) to decode and score")
    p.add_argument("--report-dir", type=Path,
                   help="folder for <manifest>.errors.jsonl, .report.md and .report.json (default: the "
                   "model file's folder)")
    p.add_argument("--results", type=Path, metavar="FILE",
                   help="also write the table as markdown to FILE (e.g. EXP_DIR/RESULTS.md), with the "
                   "date, the code's git commit, the model's size and configuration, and the decoder")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default %(default)s)")
    _add_decoding_options(p)
    p.set_defaults(run=_evaluate)

    p = sub.add_parser("align", help="draw what the model hears in one file",
                       description="Draw one audio file's log-mel spectrogram, the model's CTC posteriors "
                       "(posteriorgram) and the words, placed by CTC alignment, on one time axis, as a PNG. "
                       "The words are the decoded text's, or with --text a reference transcript's (forced "
                       "alignment): where the model hears each reference word, and where it does not.",
                       epilog="examples:\n  asr align --model exp/demo/best.pt a.flac -o a.png\n"
                       "  asr align --model exp/demo/best.pt a.flac --text \"the reference words\" -o a.png",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="model file (.pt)")
    p.add_argument("audio", type=Path, help="audio file (a few seconds to a minute draws best)")
    p.add_argument("-o", "--out", type=Path, help="PNG to write (default: <audio stem>.align.png here)")
    p.add_argument("--text", help="align this reference transcript instead of the decoded text")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default %(default)s)")
    _add_decoding_options(p)
    p.set_defaults(run=_align)

    p = sub.add_parser("lm", help="build a word n-gram language model",
                       description="Word n-gram language models for beam search.")
    lm = p.add_subparsers(dest="lm_command", required=True, metavar="ACTION")
    b = lm.add_parser("build", help="estimate an ARPA model from text",
                      description="Estimate an interpolated modified Kneser-Ney n-gram model (as KenLM's "
                      "lmplz does) from text files, one sentence a line, normalised like transcripts "
                      "(upper case, letters and apostrophes).",
                      epilog="example: asr lm build data/synthetic/lm/text.txt -o exp/lm/3gram.arpa --order 3")
    b.add_argument("text", nargs="+", type=Path, help="text files (plain or .gz), one sentence a line")
    b.add_argument("-o", "--out", required=True, type=Path, help="ARPA file to write (.gz to compress)")
    b.add_argument("--order", type=int, default=3, help="n-gram order (default %(default)s)")
    b.set_defaults(run=_lm_build)

    p = sub.add_parser("tune-lm", help="choose the LM weight and word bonus on a dev set",
                       description="Grid-search the LM weight and word bonus of beam search on a dev "
                       "manifest (the model runs once; every pair decodes the same log-probs), print the "
                       "grid, and with --save store the best pair, the LM and the beam size as the "
                       "model file's decoding settings, so transcribe and evaluate use them by default.",
                       epilog="example: asr tune-lm --model exp/demo/best.pt --manifest data/synthetic/dev.jsonl "
                       "--lm exp/demo/lm/3gram.arpa --save")
    p.add_argument("--model", required=True, type=Path, help="model file (.pt)")
    p.add_argument("--manifest", required=True, type=Path, help="dev manifest to tune on")
    p.add_argument("--lm", required=True, type=Path, help="ARPA language model (plain or .gz)")
    p.add_argument("--lexicon", default="free", help="'free' (default): any spelling; 'lm': only the "
                   "LM's words; or a word-list file")
    p.add_argument("--unk-logp", type=float, default=DEFAULT_UNK_LOGP,
                   help="LM log-probability of a word the LM lacks (default %(default)s)")
    p.add_argument("--beam-size", type=int, default=DEFAULT_BEAM_SIZE, help="beam size (default %(default)s)")
    p.add_argument("--lm-weights", type=float, nargs="+", default=list(TUNE_LM_WEIGHTS),
                   metavar="A", help="LM weights to try (default %(default)s)")
    p.add_argument("--word-bonuses", type=float, nargs="+", default=list(TUNE_WORD_BONUSES),
                   metavar="B", help="word bonuses to try (default %(default)s)")
    p.add_argument("--save", action="store_true", help="store the best settings in the model file")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default %(default)s)")
    p.set_defaults(run=_tune_lm)
    return parser


def _add_decoding_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoding", "Defaults: the settings saved in the model file (asr tune-lm "
                             "--save), else greedy. Naming --lm alone selects beam search.")
    g.add_argument("--decoder", choices=("greedy", "beam"), help="greedy or CTC prefix beam search")
    g.add_argument("--beam-size", type=int, help=f"hypotheses kept per frame (default {DEFAULT_BEAM_SIZE})")
    g.add_argument("--lm", type=Path, help="word n-gram LM, ARPA (plain or .gz), e.g. from asr lm build")
    g.add_argument("--lm-weight", type=float,
                   help=f"weight of the LM's natural-log probability (default {DEFAULT_LM_WEIGHT})")
    g.add_argument("--word-bonus", type=float,
                   help=f"score added per word (default {DEFAULT_WORD_BONUS} with an LM, 0 without)")
    g.add_argument("--lexicon", help="'free' (default): any spelling, a word the LM lacks costs "
                   "--unk-logp; 'lm': only the LM's words; or a word-list file")
    g.add_argument("--unk-logp", type=float,
                   help=f"LM log-probability (natural log) of a word the LM lacks (default {DEFAULT_UNK_LOGP})")


def _decoding_options(args) -> dict:
    return dict(decoder=args.decoder, beam_size=args.beam_size, lm=args.lm, lm_weight=args.lm_weight,
                word_bonus=args.word_bonus, lexicon=args.lexicon, unk_logp=args.unk_logp)


def _prepare_librispeech(args) -> int:
    corpus_dir = args.corpus_dir
    if not args.splits and not (args.download and args.lm):
        raise ASRError("name the subsets with --splits (or, with --download, LM files with --lm)")
    if args.download:
        from data_prep.download import DEFAULT_MIRROR, check_request, fetch_lm, fetch_splits

        if args.data_dir is None:
            raise ASRError("--download needs --data-dir DIR: the folder for the archives and the "
                           "extracted LibriSpeech/ tree")
        check_request(args.splits, args.lm, args.mirror or DEFAULT_MIRROR)  # before any byte is fetched
        fetch = dict(mirror=args.mirror or DEFAULT_MIRROR, checksums=args.checksums, progress=sys.stderr.isatty())
        corpus_dir = fetch_splits(args.splits, args.data_dir, **fetch)
        for path in fetch_lm(args.lm, args.data_dir, **fetch):
            print(f"lm: {path}")
        if not args.splits:
            return 0
    else:
        given = [flag for flag, value in (("--data-dir", args.data_dir), ("--mirror", args.mirror),
                                          ("--checksums", args.checksums), ("--lm", args.lm or None))
                 if value is not None]
        if given:
            raise ASRError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} only used with --download")
        if args.out is None:
            raise ASRError("--corpus-dir needs --out DIR: the folder for the <split>.jsonl manifests")
    if args.out is None:
        print(f"extracted: {corpus_dir}")
        return 0

    from data_prep.librispeech import prepare_split

    for split in args.splits:
        report = prepare_split(corpus_dir / split, args.out / f"{split}.jsonl")
        _print_report(split, report)
    return 0


def _prepare_synthetic(args) -> int:
    from data_prep.librispeech import prepare_split
    from data_prep.synthetic import SplitSpec, build_corpus

    paths = build_corpus(
        args.out, train=SplitSpec(args.train_speakers, args.train_utts),
        dev=SplitSpec(args.eval_speakers, args.eval_utts), test=SplitSpec(args.eval_speakers, args.eval_utts),
        lm_sentences=args.lm_sentences, max_words=args.max_words, seed=args.seed, jobs=args.jobs)
    for split in ("train", "dev", "test"):
        _print_report(split, prepare_split(paths[split], args.out / f"{split}.jsonl"))
    print(f"lm text: {paths['lm']}")
    return 0


def _print_report(split: str, report) -> None:
    print(f"{split}: {report.utterances} utterances, {report.hours:.2f} h -> {report.manifest}")
    for uid, reason in report.skipped:
        print(f"{split}: skipped {uid}: {reason}", file=sys.stderr)


def _train(args) -> int:
    from asr.config import load_config
    from asr.data import scan_manifest
    from asr.train import TrainConfig, TrainingInterrupted, train

    config = load_config(TrainConfig, args.config, args.overrides)
    args.exp_dir.mkdir(parents=True, exist_ok=True)
    main_process = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 alone reports
    if main_process:
        handler = logging.FileHandler(args.exp_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.getLogger().addHandler(handler)
    else:
        logging.getLogger().setLevel(logging.WARNING)
    (train_rows, train_bad), (dev_rows, dev_bad) = scan_manifest(args.train), scan_manifest(args.dev)
    try:
        best = train(config, train_rows, dev_rows, args.exp_dir, resume=not args.no_resume,
                     progress=not args.no_progress, stats_only=args.stats_only,
                     found={"train": train_bad, "dev": dev_bad})
    except TrainingInterrupted as e:
        if main_process:
            print(f"asr train: {e}", file=sys.stderr)
        return 128 + e.signum  # as a shell reports a process ended by that signal
    if not main_process:
        return 0
    if args.stats_only:
        print(f"feature statistics -> {args.exp_dir / 'feature_stats.pt'}")
        return 0
    print(f"best dev: WER {100 * best['wer']:.2f}%  CER {100 * best['cer']:.2f}%  "
          f"(epoch {best['epoch']}) -> {args.exp_dir / 'best.pt'}")
    return 0


def _validate(args) -> int:
    from tqdm import tqdm

    from asr.audio import audio_duration
    from asr.config import load_config
    from asr.data import Problem, scan_manifest
    from asr.text import CharTokenizer
    from asr.train import TrainConfig, usable_rows

    config = load_config(TrainConfig, args.config, args.overrides)
    unusable = 0
    for manifest in args.manifest:
        try:
            rows, problems = scan_manifest(manifest)
        except ASRError as e:
            print(f"asr validate: error: {e}", file=sys.stderr)
            unusable += 1
            continue
        keep, problems = usable_rows(rows, CharTokenizer(), config, manifest.name, problems)
        if args.decode_audio:
            for r in tqdm(keep, desc=f"{manifest.name}: audio", unit="file", leave=False,
                          disable=args.no_progress or not sys.stderr.isatty()):
                try:
                    seconds = audio_duration(r.audio)
                except ASRError as e:
                    problems.append(Problem("", r.id, "audio unreadable", str(e)))
                    continue
                if abs(seconds - r.duration) > 0.05:  # manifests round durations to 1 ms
                    problems.append(Problem("", r.id, "duration differs from the audio file's",
                                            f"{r.duration:g} s in the manifest, {seconds:.3f} s in {r.audio}"))
        for problem in problems:
            print(f"{manifest}: {problem}" if not problem.where else str(problem))
        reasons: dict[str, int] = {}
        for problem in problems:
            reasons[problem.reason] = reasons.get(problem.reason, 0) + 1
        summary = ", ".join(f"{n} {reason}" for reason, n in reasons.items()) or "all usable"
        print(f"{manifest}: {len(rows) + sum(1 for p in problems if p.where)} rows, "
              f"{len(problems)} unusable ({summary})", file=sys.stderr)
        unusable += len(problems)
    return 1 if unusable else 0


def _transcribe(args) -> int:
    from asr.timestamps import format_result
    from asr.transcribe import load_model

    fmt = args.format or ("json" if args.timestamps else "txt")
    if fmt in ("srt", "vtt") and len(args.audio) > 1 and args.output_dir is None:
        raise ASRError(f"--format {fmt} with several files needs --output-dir (one subtitle file each)")
    transcriber = load_model(args.model, device=args.device, chunk_seconds=args.chunk_seconds,
                             **_decoding_options(args))
    if args.output_dir:
        args.output_dir.mkdir(parents=True, exist_ok=True)
    failed = 0
    for path in args.audio:
        try:
            if fmt == "txt" and not args.timestamps:
                text, words = transcriber.transcribe(path), []
            else:
                text, words = transcriber.transcribe_with_timestamps(path)
        except ASRError as e:
            print(f"asr transcribe: error: {e}", file=sys.stderr)
            failed += 1
            continue
        out = f"{path}\t{text}\n" if fmt == "txt" else format_result(fmt, path, text, words)
        if args.output_dir:
            target = args.output_dir / f"{path.stem}.{fmt}"
            target.write_text(out, encoding="utf-8")
            print(f"{path}\t-> {target}", flush=True)
        else:
            print(out, end="" if out.endswith("\n") else "\n", flush=True)
    return 1 if failed else 0


def _set_names(manifests: list[Path]) -> list[str]:
    """A distinct name for each manifest: its stem, with its folder's name where stems repeat
    (and its position where even that repeats), so no two reports overwrite each other."""
    stems = [m.stem for m in manifests]
    names = [f"{m.parent.name}_{m.stem}" if stems.count(m.stem) > 1 else m.stem for m in manifests]
    return [f"{name}_{i + 1}" if names.count(name) > 1 else name for i, name in enumerate(names)]


def _evaluate(args) -> int:
    from asr.data import scan_manifest
    from asr.metrics import write_report
    from asr.report import error_report, write_error_report
    from asr.transcribe import load_model

    transcriber = load_model(args.model, device=args.device, **_decoding_options(args))
    table, failed = [], 0
    for manifest, name in zip(args.manifest, _set_names(args.manifest)):
        try:
            rows, bad_lines = scan_manifest(manifest)
        except ASRError as e:
            print(f"asr evaluate: error: {e}", file=sys.stderr)
            failed += 1
            continue
        for problem in bad_lines:  # scored without them, and the exit status says so
            print(f"asr evaluate: error: {problem}", file=sys.stderr)
        failed += len(bad_lines)
        rates, _, failures = transcriber.evaluate(rows, progress=sys.stderr.isatty())
        for f in failures:
            print(f"asr evaluate: error: {f.message}", file=sys.stderr)
        failed += len(failures)
        report_dir = args.report_dir or args.model.parent
        report = report_dir / f"{name}.errors.jsonl"
        write_report(rates, report)
        write_error_report(error_report(rates, {r.id: r.duration for r in rows}, name),
                           report_dir / f"{name}.report.md", report_dir / f"{name}.report.json")
        table.append((name, len(rates.utterances), rates.words, rates.wer, rates.cer, report))
    rows = ["| set | utterances | words | WER % | CER % | per-utterance errors |",
            "|---|---:|---:|---:|---:|---|"]
    rows += [f"| {name} | {utts} | {words} | {100 * wer:.2f} | {100 * cer:.2f} | {report} |"
             for name, utts, words, wer, cer, report in table]
    print(f"model: {args.model}")
    print("\n".join(rows))
    if args.results:
        _write_results(args.results, args.model, transcriber, rows)
    return 1 if failed else 0


def _write_results(path: Path, model_path: Path, transcriber, table: list[str]) -> None:
    """RESULTS.md: the score table with what it takes to reproduce it."""
    import dataclasses
    import datetime

    import json

    import yaml

    from asr.checkpoint import load_model_file

    model = transcriber.model
    config = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(model.config).items())
    lines = [
        f"# Results: {model_path}", "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- commit: {_git_commit()}",
        f"- model: {model.num_parameters() / 1e6:.2f} M parameters; {config}",
        f"- decoding: {_describe(transcriber.decoder)}",
        "", *table, "",
    ]
    trained_with = load_model_file(model_path).get("train_config")
    if trained_with:  # lists for tuples: plain YAML
        lines += ["Training configuration:", "", "```yaml",
                  yaml.safe_dump(json.loads(json.dumps(trained_with)), sort_keys=False).rstrip(), "```", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="utf-8")


def _describe(decoder) -> str:
    settings = getattr(decoder, "settings", None)
    if settings is None:
        return "greedy"
    return ", ".join(f"{k}={v}" for k, v in settings().items() if v is not None)


def _align(args) -> int:
    from asr.plots import draw_alignment
    from asr.transcribe import load_model

    transcriber = load_model(args.model, device=args.device, **_decoding_options(args))
    out = args.out or Path(f"{args.audio.stem}.align.png")
    text, words, png = draw_alignment(transcriber, args.audio, out, text=args.text)
    print(f"{args.audio}\t{text}\t-> {png}")
    for w in words:
        print(f"  {w.start:7.2f} {w.end:7.2f}  {w.confidence:4.2f}  {w.word}")
    return 0


def _lm_build(args) -> int:
    from asr.lm import build_lm, read_sentences, write_arpa

    lm = build_lm(read_sentences(args.text), order=args.order)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_arpa(lm, args.out)
    sizes = ", ".join(f"{len(grams)} {n + 1}-grams" for n, grams in enumerate(lm.ngrams))
    print(f"{args.out}: order {lm.order}, {sizes}")
    return 0


def _tune_lm(args) -> int:
    from asr.checkpoint import load_model_file, save_model_file
    from asr.data import read_manifest
    from asr.transcribe import load_model, tune_lm

    transcriber = load_model(args.model, device=args.device)
    lexicon = args.lexicon if args.lexicon in ("lm", "free") else str(Path(args.lexicon).resolve())
    results, best, failures = tune_lm(
        transcriber, read_manifest(args.manifest), args.lm.resolve(), lexicon=lexicon, unk_logp=args.unk_logp,
        beam_size=args.beam_size,
        lm_weights=args.lm_weights, word_bonuses=args.word_bonuses, progress=sys.stderr.isatty())
    for f in failures:
        print(f"asr tune-lm: error: {f.message}", file=sys.stderr)
    print("| LM weight | word bonus | WER % | CER % |\n|---:|---:|---:|---:|")
    for r in results:
        mark = " **best**" if (r.lm_weight, r.word_bonus) == (best["lm_weight"], best["word_bonus"]) else ""
        print(f"| {r.lm_weight:g} | {r.word_bonus:g} | {100 * r.rates.wer:.2f} | {100 * r.rates.cer:.2f} |{mark}")
    if args.save:
        payload = load_model_file(args.model)
        payload["decoding"] = best
        save_model_file(payload, args.model)
        print(f"saved to {args.model}: " + ", ".join(f"{k}={v}" for k, v in best.items() if v is not None))
    return 1 if failures else 0


def _git_commit() -> str:
    """The commit of the code that scored, with '+changes' when the tree differs from it."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                                text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (git not available)"
    if commit.returncode != 0:
        return "unknown (not a git checkout)"
    return commit.stdout.strip() + (" +changes" if dirty.stdout.strip() else "")


if __name__ == "__main__":
    sys.exit(main())
