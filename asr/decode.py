"""From CTC log-probs to text. Every decoder has one signature:

    decoder(log_probs (B, T, V), lengths (B,)) -> list of B strings

so callers swap greedy for beam search without knowing which they hold.

Beam search is CTC prefix search (Hannun et al. 2014, "First-pass large vocabulary continuous
speech recognition using bi-directional recurrent DNNs") with a word n-gram LM fused at word
boundaries: a hypothesis scores

    log P_ctc(prefix) + lm_weight * ln P_lm(words) + word_bonus * len(words)

and a word still being spelled is scored by the best unigram it can still become (the
look-ahead flashlight calls smearing), so an LM prunes misspellings before they finish. Words
the LM does not know cost `unk_logp`; with a lexicon they cannot be spelled at all. The search
runs compiled (numba) and without the GIL, one utterance per thread.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import numba
import numpy as np
import torch

from asr.errors import LMError, TextError
from asr.text import CharTokenizer

LN10 = math.log(10.0)
# Defaults for an LM the model was not tuned with (asr tune-lm finds better ones for a given pair).
DEFAULT_BEAM_SIZE = 50
DEFAULT_LM_WEIGHT = 0.8
DEFAULT_WORD_BONUS = 1.0
DEFAULT_UNK_LOGP = -30.0  # ln-probability of a word the LM lacks: rare enough to need clear acoustics
# Prefix nodes made before the search first drops those no hypothesis descends from: 64k nodes
# are ~6 MB, and an utterance of LibriSpeech's length never makes that many.
COMPACT_NODES = 1 << 16


class Decoder(Protocol):
    def __call__(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> list[str]: ...


class GreedyDecoder:
    """Best token per frame, repeats merged, blanks removed."""

    def __init__(self, tokenizer: CharTokenizer):
        self.tokenizer = tokenizer

    def __call__(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        best = log_probs.argmax(dim=-1).cpu()  # (B, T)
        texts = []
        for ids, n in zip(best, lengths.tolist()):
            ids = torch.unique_consecutive(ids[:n])
            texts.append(" ".join(self.tokenizer.decode(ids.tolist()).split()))
        return texts


# ---------------------------------------------------------------------------------------------
# The LM and the lexicon as flat arrays the compiled search can read.


class _LMTables:
    """A back-off n-gram LM as sorted integer keys, for binary search without the GIL.

    A state is a context the LM lists (an n-gram of order < N); state 0 is the empty context.
    Entry e, keyed state * n_words + word, holds ln P(word | state) and the state that follows.
    An absent key backs off: add the state's back-off weight and drop its oldest word.
    """

    def __init__(self, lm):
        words = [w for w in lm.ngrams[0] if len(w) == 1]
        self.word_id = {w[0]: i for i, w in enumerate(words)}
        self.n_words = len(words)
        states: dict[tuple[str, ...], int] = {(): 0}
        for order in range(1, lm.order):
            for ngram in lm.ngrams[order - 1]:
                states[ngram] = len(states)
        backoff = np.zeros(len(states))
        suffix = np.zeros(len(states), dtype=np.int64)
        for ngram, s in states.items():
            if ngram:
                backoff[s] = lm.ngrams[len(ngram) - 1][ngram][1] * LN10
                suffix[s] = states.get(ngram[1:], 0)
        keys, logp, nxt = [], [], []
        for order in range(1, lm.order + 1):
            for ngram, (lp, _) in lm.ngrams[order - 1].items():
                context = states.get(ngram[:-1])
                if context is None:  # an n-gram whose context is not listed can never be reached
                    continue
                follow = ngram[-(lm.order - 1):] if lm.order > 1 else ()
                while follow not in states:
                    follow = follow[1:]
                keys.append(context * self.n_words + self.word_id[ngram[-1]])
                logp.append(lp * LN10)
                nxt.append(states[follow])
        order_ = np.argsort(np.array(keys, dtype=np.int64), kind="stable")
        self.keys = np.array(keys, dtype=np.int64)[order_]
        self.logp = np.array(logp, dtype=np.float64)[order_]
        self.next = np.array(nxt, dtype=np.int64)[order_]
        self.backoff, self.suffix = backoff, suffix
        self.bos_state = states.get(("<s>",), 0)
        self.eos = self.word_id.get("</s>", -1)

    def unigram_logp(self, word: str) -> float:
        i = np.searchsorted(self.keys, self.word_id[word])
        return float(self.logp[i])


NOT_A_WORD = -2  # a trie node where no word ends


class _Trie:
    """The words a hypothesis may spell, as a trie over token ids; node 0 is the empty word.

    Each node keeps what ends there (NOT_A_WORD; a word's LM id; -1 for a word the LM lacks) and
    the best unigram ln probability below it, the look-ahead score of a word still being spelled.
    """

    def __init__(self, words: list[str], tokenizer: CharTokenizer, lm_ids: dict[str, int] | None,
                 unigram: dict[str, float] | None):
        children: list[dict[int, int]] = [{}]
        word_at = [NOT_A_WORD]
        best = [-np.inf]
        space = tokenizer.encode(" ")[0]
        for word in words:
            try:
                ids = tokenizer.encode(word)
            except TextError:  # a word the model cannot spell can never be decoded
                continue
            if not ids or space in ids:
                continue
            score = unigram[word] if unigram is not None else 0.0
            node = 0
            best[0] = max(best[0], score)
            for t in ids:
                if t not in children[node]:
                    children[node][t] = len(children)
                    children.append({})
                    word_at.append(NOT_A_WORD)
                    best.append(-np.inf)
                node = children[node][t]
                best[node] = max(best[node], score)
            word_at[node] = lm_ids[word] if lm_ids is not None else -1
        vocab = len(tokenizer)
        pairs = sorted((n * vocab + t, c) for n, kids in enumerate(children) for t, c in kids.items())
        self.keys = np.array([k for k, _ in pairs], dtype=np.int64)
        self.child = np.array([c for _, c in pairs], dtype=np.int64)
        self.word = np.array(word_at, dtype=np.int64)
        self.smear = np.array(best, dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# The compiled search.


@numba.njit(nogil=True, cache=True)
def _find(keys, key):
    """Index of `key` in the sorted array `keys`, or -1."""
    lo, hi = 0, keys.shape[0]
    while lo < hi:
        mid = (lo + hi) >> 1
        if keys[mid] < key:
            lo = mid + 1
        else:
            hi = mid
    if lo < keys.shape[0] and keys[lo] == key:
        return lo
    return -1


@numba.njit(nogil=True, cache=True)
def _lm_score(word, state, n_words, keys, logp, nxt, backoff, suffix, unk_logp):
    """(ln P(word | state), next state) with back-off; an unknown word costs unk_logp."""
    total = 0.0
    while True:
        e = _find(keys, state * n_words + word) if word >= 0 else -1
        if e >= 0:
            return total + logp[e], nxt[e]
        if state == 0:
            return total + unk_logp, 0
        total += backoff[state]
        state = suffix[state]


@numba.njit(nogil=True, cache=True)
def _logaddexp(a, b):
    if a == -np.inf:
        return b
    if b == -np.inf:
        return a
    if a > b:
        return a + math.log1p(math.exp(b - a))
    return b + math.log1p(math.exp(a - b))


# Columns of the prefix-node table.
PARENT, TOKEN, TRIE, STATE = 0, 1, 2, 3  # ints; TRIE: 0 no word begun, -1 a word the trie lacks
LM_DONE, LM_PART = 0, 1  # floats: alpha*ln P(finished words) + beta*count; look-ahead of the word begun


@numba.njit(nogil=True, cache=True)
def _extend(n, c, nodes, scores, n_nodes, kids, space, V, use_trie, lexicon_only, t_keys, t_child,
            t_word, t_smear, has_lm, n_words, l_keys, l_logp, l_next, l_backoff, l_suffix, unk_logp,
            alpha, beta):
    """The node for prefix n + token c, made on first use; -1 when the lexicon forbids it."""
    key = n * V + c
    if key in kids:
        return kids[key], nodes, scores, n_nodes
    here = nodes[n, TRIE]
    lm_done, lm_part, st = scores[n, LM_DONE], 0.0, nodes[n, STATE]
    if c == space:  # a word ends: the LM scores it (an id < 0 as a word it lacks)
        word = t_word[here] if here > 0 else NOT_A_WORD
        if lexicon_only and word == NOT_A_WORD:
            return -1, nodes, scores, n_nodes
        if has_lm:
            w_lp, st = _lm_score(word, st, n_words, l_keys, l_logp, l_next, l_backoff, l_suffix, unk_logp)
            lm_done += alpha * w_lp
        lm_done += beta
        trie = 0
    else:
        trie = -1
        if use_trie and here >= 0:
            e = _find(t_keys, here * V + c)
            if e >= 0:
                trie = t_child[e]
        if trie < 0 and lexicon_only:
            return -1, nodes, scores, n_nodes
        if has_lm:
            lm_part = alpha * (t_smear[trie] if trie > 0 else unk_logp)
    if n_nodes == nodes.shape[0]:
        bigger = np.empty((2 * n_nodes, nodes.shape[1]), nodes.dtype)
        bigger[:n_nodes] = nodes
        nodes = bigger
        more = np.empty((2 * n_nodes, scores.shape[1]), scores.dtype)
        more[:n_nodes] = scores
        scores = more
    child = n_nodes
    nodes[child, PARENT], nodes[child, TOKEN], nodes[child, TRIE] = n, c, trie
    nodes[child, STATE] = st
    scores[child, LM_DONE], scores[child, LM_PART] = lm_done, lm_part
    kids[key] = child
    return child, nodes, scores, n_nodes + 1


@numba.njit(nogil=True, cache=True)
def _add(node, add_b, add_nb, slot, nb_node, nb_pb, nb_pnb, n_next):
    """Add path probability to `node` in the next beam (ending in blank / in a token)."""
    j = slot[node]
    if j < 0:
        slot[node] = n_next
        nb_node[n_next], nb_pb[n_next], nb_pnb[n_next] = node, add_b, add_nb
        return n_next + 1
    nb_pb[j] = _logaddexp(nb_pb[j], add_b)
    nb_pnb[j] = _logaddexp(nb_pnb[j], add_nb)
    return n_next


@numba.njit(nogil=True, cache=True)
def _compact(beam, nodes, scores, n_nodes, V):
    """Keep only the prefixes in `beam` and their ancestors, renumbered in the order they were
    made (a parent before its children), and rebuild the child index over them; `beam` is
    renumbered in place. A node dropped here is one no surviving prefix can reach again but
    by extending its parent anew, which makes it afresh with the same contents, so the search
    goes on exactly as before. Returns (nodes, scores, node count, kids)."""
    keep = np.zeros(n_nodes, np.bool_)
    keep[0] = True
    for i in range(beam.shape[0]):
        n = beam[i]
        while not keep[n]:
            keep[n] = True
            n = nodes[n, PARENT]
    new_id = np.full(n_nodes, -1, np.int64)
    m = 0
    for n in range(n_nodes):  # rows move down only, so none is overwritten before it is read
        if keep[n]:
            new_id[n] = m
            nodes[m, :] = nodes[n, :]
            scores[m, :] = scores[n, :]
            if m > 0:
                nodes[m, PARENT] = new_id[nodes[m, PARENT]]
            m += 1
    kids = numba.typed.Dict.empty(numba.int64, numba.int64)
    for k in range(1, m):
        kids[nodes[k, PARENT] * V + nodes[k, TOKEN]] = k
    for i in range(beam.shape[0]):
        beam[i] = new_id[beam[i]]
    return nodes, scores, m, kids


@numba.njit(nogil=True, cache=True)
def _prefix_search(lp, blank, space, beam_size, token_min_logp, beam_prune_logp,
                   use_trie, lexicon_only, t_keys, t_child, t_word, t_smear,
                   has_lm, n_words, l_keys, l_logp, l_next, l_backoff, l_suffix, bos_state, eos,
                   unk_logp, alpha, beta, compact_nodes):
    """Best token sequence (spaces included, blanks and repeats gone) for log-probs (T, V).
    Once `compact_nodes` prefix nodes exist, those no beam entry descends from are dropped
    (_compact), and again whenever the count doubles what was kept."""
    T, V = lp.shape
    neg = -np.inf
    nodes = np.empty((1024, 4), np.int64)
    scores = np.empty((1024, 2), np.float64)
    nodes[0, PARENT], nodes[0, TOKEN], nodes[0, TRIE], nodes[0, STATE] = -1, -1, 0, bos_state
    scores[0, LM_DONE], scores[0, LM_PART] = 0.0, 0.0
    n_nodes = 1
    kids = numba.typed.Dict.empty(numba.int64, numba.int64)
    slot = np.full(1024, -1, np.int64)
    compact_at = compact_nodes

    beam = np.zeros(1, np.int64)
    pb = np.zeros(1)
    pnb = np.full(1, neg)
    size = beam_size * (V + 1) + 1
    nb_node, nb_pb, nb_pnb = np.empty(size, np.int64), np.empty(size), np.empty(size)

    for t in range(T):
        row = lp[t]
        best_token = np.argmax(row)
        n_next = 0
        for i in range(beam.shape[0]):
            n = beam[i]
            p_total = _logaddexp(pb[i], pnb[i])
            last = nodes[n, TOKEN]
            for c in range(V):
                x = row[c]
                if x < token_min_logp and c != best_token and c != blank:
                    continue
                if c == blank:
                    n_next = _add(n, p_total + x, neg, slot, nb_node, nb_pb, nb_pnb, n_next)
                    continue
                if c == space and nodes[n, TRIE] == 0:
                    # No word to end: a repeated space collapses, any other acts as a blank.
                    if last == space:
                        n_next = _add(n, pb[i] + x, pnb[i] + x, slot, nb_node, nb_pb, nb_pnb, n_next)
                    else:
                        n_next = _add(n, p_total + x, neg, slot, nb_node, nb_pb, nb_pnb, n_next)
                    continue
                from_ = p_total
                if c == last:
                    # The repeat collapses onto this prefix; only after a blank is it a new letter.
                    n_next = _add(n, neg, pnb[i] + x, slot, nb_node, nb_pb, nb_pnb, n_next)
                    from_ = pb[i]
                if from_ == neg:
                    continue
                child, nodes, scores, n_nodes = _extend(
                    n, c, nodes, scores, n_nodes, kids, space, V, use_trie, lexicon_only, t_keys,
                    t_child, t_word, t_smear, has_lm, n_words, l_keys, l_logp, l_next, l_backoff,
                    l_suffix, unk_logp, alpha, beta)
                if child < 0:
                    continue
                if child >= slot.shape[0]:
                    slot = np.concatenate((slot, np.full(slot.shape[0], -1, np.int64)))
                n_next = _add(child, neg, from_ + x, slot, nb_node, nb_pb, nb_pnb, n_next)
        # Keep the best `beam_size` prefixes within `beam_prune_logp` of the best.
        score = np.empty(n_next)
        for j in range(n_next):
            node = nb_node[j]
            slot[node] = -1
            score[j] = _logaddexp(nb_pb[j], nb_pnb[j]) + scores[node, LM_DONE] + scores[node, LM_PART]
        order = np.argsort(-score)[:beam_size]
        keep = 1
        while keep < order.shape[0] and score[order[keep]] >= score[order[0]] + beam_prune_logp:
            keep += 1
        order = order[:keep]
        beam, pb, pnb = nb_node[order].copy(), nb_pb[order].copy(), nb_pnb[order].copy()
        # Every extension tried makes a node, so over a long file (an hour is 90k frames) the
        # table would grow by MBs a minute; the prefixes alive are only the beam's ancestry.
        if n_nodes >= compact_at:
            nodes, scores, n_nodes, kids = _compact(beam, nodes, scores, n_nodes, V)
            compact_at = max(compact_nodes, 2 * n_nodes)

    # Finish. A prefix ending in a space is the same text as the one before the space: pool them.
    ends = np.empty(beam.shape[0], np.int64)
    acoustic = np.full(beam.shape[0], neg)
    n_ends = 0
    for i in range(beam.shape[0]):
        n = beam[i]
        if nodes[n, TOKEN] == space:
            n = nodes[n, PARENT]
        j = 0
        while j < n_ends and ends[j] != n:
            j += 1
        if j == n_ends:
            ends[j] = n
            n_ends += 1
        acoustic[j] = _logaddexp(acoustic[j], _logaddexp(pb[i], pnb[i]))
    # The LM scores the last word and the end of the sentence.
    best, best_score = -1, neg
    for j in range(n_ends):
        n = ends[j]
        s = acoustic[j] + scores[n, LM_DONE]
        st = nodes[n, STATE]
        if nodes[n, TRIE] != 0:
            word = t_word[nodes[n, TRIE]] if nodes[n, TRIE] > 0 else NOT_A_WORD
            if lexicon_only and word == NOT_A_WORD:
                continue
            if has_lm:
                w_lp, st = _lm_score(word, st, n_words, l_keys, l_logp, l_next, l_backoff, l_suffix, unk_logp)
                s += alpha * w_lp
            s += beta
        if has_lm and eos >= 0:
            e_lp, st = _lm_score(eos, st, n_words, l_keys, l_logp, l_next, l_backoff, l_suffix, unk_logp)
            s += alpha * e_lp
        if s > best_score:
            best, best_score = n, s
    if best < 0:  # no hypothesis ends in a lexicon word: keep the best-scored one as it is
        best = beam[0]
    length, n = 0, best
    while n > 0:
        length += 1
        n = nodes[n, PARENT]
    out = np.empty(length, np.int64)
    n = best
    while n > 0:
        length -= 1
        out[length] = nodes[n, TOKEN]
        n = nodes[n, PARENT]
    return out, best_score


# ---------------------------------------------------------------------------------------------


class BeamSearchDecoder:
    """CTC prefix beam search, lexicon-free or within a lexicon, with an optional word n-gram LM.

    lm: an ARPA file (plain or .gz) or an `asr.lm.NGramLM`. lm_weight (alpha) scales its natural-log
    probabilities; word_bonus (beta) is added per word (default: DEFAULT_WORD_BONUS with an LM, 0
    without). lexicon: "free" (any spelling, the default; a word the LM lacks costs lm_weight *
    unk_logp), "lm" (only the LM's words) or a word-list file.
    Per frame only tokens with ln p >= token_min_logp (and the best) are tried, and prefixes more
    than -beam_prune_logp below the best are dropped. The utterances of a batch are searched on
    `num_workers` threads (default: all cores).
    """

    def __init__(self, tokenizer: CharTokenizer, beam_size: int = DEFAULT_BEAM_SIZE, lm=None,
                 lm_weight: float = DEFAULT_LM_WEIGHT, word_bonus: float | None = None,
                 lexicon: str | os.PathLike = "free", unk_logp: float = DEFAULT_UNK_LOGP,
                 token_min_logp: float = -8.0, beam_prune_logp: float = -12.0, num_workers: int | None = None):
        if beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {beam_size}")
        self.tokenizer = tokenizer
        self.beam_size, self.lm_weight = int(beam_size), float(lm_weight)
        self.word_bonus = float(word_bonus if word_bonus is not None else DEFAULT_WORD_BONUS if lm else 0.0)
        self.unk_logp = float(unk_logp)
        self.token_min_logp, self.beam_prune_logp = float(token_min_logp), float(beam_prune_logp)
        self.num_workers = num_workers or os.cpu_count() or 1
        self.space = tokenizer.encode(" ")[0]
        self.lm_path = None
        if lm is not None and not hasattr(lm, "ngrams"):
            from asr.lm import read_arpa

            self.lm_path, lm = str(lm), read_arpa(lm)
        self.lm = _LMTables(lm) if lm is not None else None
        self.lexicon = str(lexicon)
        self.trie = None
        if self.lexicon != "free" or self.lm is not None:
            if self.lexicon in ("lm", "free"):
                if self.lm is None:
                    raise ValueError("lexicon='lm' needs an LM")
                words = [w for w in self.lm.word_id if w not in ("<s>", "</s>", "<unk>")]
            else:
                try:
                    words = Path(self.lexicon).read_text(encoding="utf-8").split()
                except OSError as e:
                    raise LMError(f"{self.lexicon}: cannot read the lexicon ({e.strerror or e})") from None
            lm_ids = unigram = None
            if self.lm is not None:
                lm_ids = {w: self.lm.word_id.get(w, -1) for w in words}
                unigram = {w: self.lm.unigram_logp(w) if w in self.lm.word_id else self.unk_logp for w in words}
            self.trie = _Trie(words, tokenizer, lm_ids, unigram)

    def settings(self) -> dict:
        """What a model file keeps to decode the same way again."""
        return {"decoder": "beam", "beam_size": self.beam_size, "lm": self.lm_path, "lm_weight": self.lm_weight,
                "word_bonus": self.word_bonus, "lexicon": self.lexicon, "unk_logp": self.unk_logp}

    def search(self, log_probs: np.ndarray) -> tuple[list[int], float]:
        """Token ids of the best hypothesis for one utterance's (T, V) log-probs, and its score."""
        no_i, no_f = np.zeros(1, np.int64), np.zeros(1, np.float64)
        trie, lm = self.trie, self.lm
        ids, score = _prefix_search(
            np.ascontiguousarray(log_probs, dtype=np.float32), self.tokenizer.blank_id, self.space,
            self.beam_size, self.token_min_logp, self.beam_prune_logp,
            trie is not None, self.lexicon != "free",
            trie.keys if trie else no_i, trie.child if trie else no_i,
            trie.word if trie else np.full(1, NOT_A_WORD, np.int64), trie.smear if trie else no_f,
            lm is not None, lm.n_words if lm else 1, lm.keys if lm else no_i, lm.logp if lm else no_f,
            lm.next if lm else no_i, lm.backoff if lm else no_f, lm.suffix if lm else no_i,
            lm.bos_state if lm else 0, lm.eos if lm else -1, self.unk_logp, self.lm_weight, self.word_bonus,
            COMPACT_NODES)
        return ids.tolist(), float(score)

    def __call__(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        lp = log_probs.detach().float().cpu().numpy()
        return self.decode_each([lp[b, :n] for b, n in enumerate(lengths.tolist())])

    def decode_each(self, log_probs: list[np.ndarray]) -> list[str]:
        """Texts of utterances given as separate (T, V) arrays, searched in parallel."""
        if self.num_workers > 1 and len(log_probs) > 1:
            with ThreadPoolExecutor(min(self.num_workers, len(log_probs))) as pool:
                found = list(pool.map(self.search, log_probs))
        else:
            found = [self.search(x) for x in log_probs]
        return [" ".join(self.tokenizer.decode(ids).split()) for ids, _ in found]


def build_decoder(name: str, tokenizer: CharTokenizer, **options) -> Decoder:
    """The decoder called `name`: 'greedy', or 'beam' with BeamSearchDecoder's options."""
    if name == "greedy":
        return GreedyDecoder(tokenizer)
    if name == "beam":
        return BeamSearchDecoder(tokenizer, **options)
    raise ValueError(f"unknown decoder {name!r}: choose 'greedy' or 'beam'")
