"""The error report of one scored set: what the model gets wrong, for people and for tools.

Built from asr.metrics.ErrorRates, so its totals are the corpus WER/CER that `asr evaluate`
prints. `error_report` gathers, as plain dicts and lists (the JSON file is exactly that):

    summary       sclite-style totals for words and characters: reference length, correct,
                  substitutions, deletions, insertions, errors, error rate; utterances with errors
    confusions    the most frequent substitutions ("ref -> hyp"), deleted and inserted words
    by_speaker    WER per speaker, worst first; the speaker is the id's part before the first "-"
                  (LibriSpeech ids are "speaker-chapter-utterance"; an id without "-" is its own)
    by_duration   WER per duration bucket (DURATION_BUCKETS), from the manifest's durations
    utterances    every utterance with its counts and word alignment, worst first

`render_markdown` lays the same numbers out for people, with each utterance's alignment in the
sclite way: correct words in lower case, errors in upper case, `***` where a word is missing.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from asr.metrics import ErrorRates, UtteranceErrors

# Lower edges of the duration buckets, in seconds; the last bucket has no upper edge.
DURATION_BUCKETS = (0.0, 2.0, 5.0, 10.0, 20.0)
TOP_CONFUSIONS = 20
ALIGNMENT_WIDTH = 100  # characters; longer alignments wrap onto further REF/HYP/EVAL lines


def speaker_of(uid: str) -> str:
    """The speaker of a LibriSpeech-style id "speaker-chapter-utterance": "1272-128104-0000" -> "1272"."""
    return uid.split("-", 1)[0]


def _bucket_name(i: int) -> str:
    edges = DURATION_BUCKETS
    if i == 0:
        return f"< {edges[1]:g} s"
    return f">= {edges[i]:g} s" if i == len(edges) - 1 else f"{edges[i]:g}-{edges[i + 1]:g} s"


def duration_bucket(seconds: float | None) -> str:
    """The name of the DURATION_BUCKETS bucket that holds `seconds`: 3.2 -> "2-5 s"; None -> "unknown"."""
    if seconds is None:
        return "unknown"
    return _bucket_name(sum(seconds >= edge for edge in DURATION_BUCKETS[1:]))


def _totals(reference: int, s: int, d: int, i: int) -> dict:
    """One row of the summary: correct = reference - substitutions - deletions."""
    return {"reference": reference, "correct": reference - s - d, "substitutions": s, "deletions": d,
            "insertions": i, "errors": s + d + i, "rate": (s + d + i) / max(reference, 1)}


def _wer_rows(groups: dict[str, list[UtteranceErrors]], key: str) -> list[dict]:
    """WER of each group of utterances, summed over the group (not averaged)."""
    rows = []
    for name, utts in groups.items():
        t = _totals(sum(u.words for u in utts), sum(u.substitutions for u in utts),
                    sum(u.deletions for u in utts), sum(u.insertions for u in utts))
        rows.append({key: name, "utterances": len(utts), "words": t["reference"],
                     "substitutions": t["substitutions"], "deletions": t["deletions"],
                     "insertions": t["insertions"], "errors": t["errors"], "wer": t["rate"]})
    return rows


def _most_common(counts: Counter, top: int) -> list:
    """(item, count) pairs, most frequent first, ties in alphabetical order."""
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]


def error_report(rates: ErrorRates, durations: dict[str, float] | None = None, name: str = "",
                 top: int = TOP_CONFUSIONS) -> dict:
    """The error report of `rates` (see the module docstring); `durations` maps utterance ids
    to seconds (manifest rows), `top` is how many confusions of each kind to list."""
    durations = durations or {}
    utts = rates.utterances
    summary = {
        "utterances": len(utts),
        "utterances_with_errors": sum(u.word_errors > 0 for u in utts),
        "words": _totals(rates.words, sum(u.substitutions for u in utts),
                         sum(u.deletions for u in utts), sum(u.insertions for u in utts)),
        "characters": _totals(rates.chars, sum(u.char_substitutions for u in utts),
                              sum(u.char_deletions for u in utts), sum(u.char_insertions for u in utts)),
    }
    steps = [step for u in utts for step in u.alignment]
    confusions = {
        "substitutions": [{"reference": r, "hypothesis": h, "count": n} for (r, h), n in
                          _most_common(Counter((r, h) for op, r, h in steps if op == "S"), top)],
        "deletions": [{"word": w, "count": n} for w, n in
                      _most_common(Counter(r for op, r, _ in steps if op == "D"), top)],
        "insertions": [{"word": w, "count": n} for w, n in
                       _most_common(Counter(h for op, _, h in steps if op == "I"), top)],
    }
    by_speaker: dict[str, list[UtteranceErrors]] = {}
    for u in utts:
        by_speaker.setdefault(speaker_of(u.id), []).append(u)
    speakers = sorted(_wer_rows(by_speaker, "speaker"), key=lambda r: (-r["wer"], -r["errors"], r["speaker"]))
    order = [_bucket_name(i) for i in range(len(DURATION_BUCKETS))] + ["unknown"]
    by_duration: dict[str, list[UtteranceErrors]] = {b: [] for b in order}
    for u in utts:
        by_duration[duration_bucket(durations.get(u.id))].append(u)
    buckets = _wer_rows({b: us for b, us in by_duration.items() if us}, "duration")
    worst_first = sorted(utts, key=lambda u: (-u.word_errors, u.id))  # as errors.jsonl
    return {
        "name": name,
        "summary": summary,
        "confusions": confusions,
        "by_speaker": speakers,
        "by_duration": buckets,
        "utterances": [{
            "id": u.id, "speaker": speaker_of(u.id), "duration": durations.get(u.id),
            "words": u.words, "substitutions": u.substitutions, "deletions": u.deletions,
            "insertions": u.insertions, "word_errors": u.word_errors,
            "wer": u.word_errors / max(u.words, 1), "chars": u.chars, "char_errors": u.char_errors,
            "reference": u.reference, "hypothesis": u.hypothesis,
            "alignment": [list(step) for step in u.alignment],
        } for u in worst_first],
    }


def alignment_lines(alignment: list, width: int = ALIGNMENT_WIDTH) -> list[str]:
    """REF/HYP/EVAL lines of an alignment, sclite style, columns padded to line up:

    >>> print("\\n".join(alignment_lines([("C", "THE", "THE"), ("I", "", "BIG"), ("S", "CAT", "CAP")])))
    REF:  the *** CAT
    HYP:  the BIG CAP
    EVAL:     I   S
    """
    ref, hyp, ops = [], [], []
    for op, r, h in alignment:
        w = max(len(r), len(h), 3 if op in "DI" else 1)  # "***", never a lone "*"
        ref.append((r.lower() if op == "C" else r or "*" * w).ljust(w))
        hyp.append((h.lower() if op == "C" else h or "*" * w).ljust(w))
        ops.append(("" if op == "C" else op).ljust(w))
    lines, start = [], 0
    while True:  # one REF/HYP/EVAL triple per `width` characters, at least one column each
        end, used = start, len("REF: ")  # each cell adds itself and the space before it
        while end < len(ref) and (end == start or used + 1 + len(ref[end]) <= width):
            used += 1 + len(ref[end])
            end += 1
        for label, cells in (("REF:  ", ref), ("HYP:  ", hyp), ("EVAL: ", ops)):
            lines.append((label + " ".join(cells[start:end])).rstrip())
        if end >= len(ref):
            return lines
        start = end


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _table(header: list[str], rows: list[list], right_from: int = 1) -> list[str]:
    """A Markdown table, columns from `right_from` on right-aligned (numbers); "None." for no rows."""
    if not rows:
        return ["None."]
    cell = lambda x: str(x).replace("|", "\\|")  # noqa: E731
    align = ["---" if i < right_from else "---:" for i in range(len(header))]
    return ["| " + " | ".join(map(cell, row)) + " |" for row in [header, align, *rows]]


def render_markdown(report: dict) -> str:
    """The report as Markdown: headings, tables, and the alignments in one fenced block."""
    s, w, c = report["summary"], report["summary"]["words"], report["summary"]["characters"]
    n, wrong = s["utterances"], s["utterances_with_errors"]
    out = [f"# Error report: {report['name']}" if report["name"] else "# Error report", "",
           f"WER {_pct(w['rate'])} % and CER {_pct(c['rate'])} % over {n} utterances ({w['reference']} "
           f"words, {c['reference']} characters counting the spaces between words); {wrong} utterances "
           f"({_pct(wrong / max(n, 1))} %) have a word error.", "", "## Summary", ""]
    counts = ["reference", "correct", "substitutions", "deletions", "insertions", "errors"]
    out += _table(["unit", "utterances", *counts, "error rate %"],
                  [[unit, n, *(t[k] for k in counts), _pct(t["rate"])]
                   for unit, t in (("words", w), ("characters", c))])
    conf = report["confusions"]
    out += ["", "## Most frequent confusions", "", "### Substitutions", ""]
    out += _table(["reference -> hypothesis", "count"],
                  [[f"{x['reference']} -> {x['hypothesis']}", x["count"]] for x in conf["substitutions"]])
    for kind in ("deletions", "insertions"):
        out += ["", f"### {kind.capitalize()}", ""]
        out += _table(["word", "count"], [[x["word"], x["count"]] for x in conf[kind]])
    for key, title in (("by_speaker", "speaker"), ("by_duration", "duration")):
        out += ["", f"## WER by {title}", ""]
        if key == "by_speaker":
            out += ["Speaker: the utterance id up to its first `-` (LibriSpeech ids are "
                    "`speaker-chapter-utterance`); worst first.", ""]
        counts = ["utterances", "words", "substitutions", "deletions", "insertions"]
        out += _table([title, *counts, "WER %"], [[r[title], *(r[k] for k in counts), _pct(r["wer"])]
                                                  for r in report[key]])
    out += ["", "## Utterances, worst first", "",
            "Correct words in lower case, errors in upper case; `***` holds the place of a word "
            "missing on one side; EVAL marks S(ubstitution), D(eletion), I(nsertion).", "", "```"]
    for i, u in enumerate(report["utterances"]):
        duration = "" if u["duration"] is None else f"  {u['duration']:.2f} s"
        out += ([""] if i else []) + [
            f"{u['id']}{duration}  {u['words']} words, WER {_pct(u['wer'])} %: "
            f"S={u['substitutions']} D={u['deletions']} I={u['insertions']}"]
        out += alignment_lines(u["alignment"])
    out += ["```", ""]
    return "\n".join(out)


def write_error_report(report: dict, md_path: str | os.PathLike, json_path: str | os.PathLike) -> None:
    """The report as Markdown (for people) and JSON (for tools), the same numbers in both."""
    for path, text in ((md_path, render_markdown(report)),
                       (json_path, json.dumps(report, indent=1, ensure_ascii=False) + "\n")):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text, encoding="utf-8")
