"""Text normalisation and the character tokenizer.

One normalisation serves manifests, training targets and scoring: upper case, letters,
apostrophe and single spaces (the LibriSpeech convention), so WER is computed on the same
alphabet the model emits.
"""

from __future__ import annotations

import re
import unicodedata

from asr.errors import TextError

BLANK = "<blank>"
# Index 0 is the CTC blank; the rest is the LibriSpeech character set.
CHARACTERS = [" ", "'"] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "`": "'", "\u00b4": "'"})
_NOT_IN_ALPHABET = re.compile(r"[^A-Z' ]+")
_SPACES = re.compile(r" +")


def normalize_text(text: str) -> str:
    """Upper-case `text`, fold accents, keep letters and apostrophes, one space between words.

    Hyphens and other punctuation become word breaks; digits and symbols are dropped.
    >>> normalize_text("Don’t  stop—Café, 2 times!")
    "DON'T STOP CAFE TIMES"
    """
    text = re.sub(r"[-\u2010-\u2015_/\s]", " ", text.translate(_APOSTROPHES))
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii").upper()
    text = re.sub(r"[^A-Z0-9' ]+", "", text)  # punctuation glues to nothing: "U.S." -> "US"
    text = _NOT_IN_ALPHABET.sub(" ", text)
    # Apostrophes that quote rather than elide ('TIS stays, 'HELLO' loses its quotes).
    words = [w.strip("'") if w.startswith("'") and w.endswith("'") else w for w in text.split(" ")]
    return _SPACES.sub(" ", " ".join(words)).strip()


class CharTokenizer:
    """Maps normalised text to token ids and back; id 0 is the CTC blank."""

    def __init__(self, characters: list[str] | None = None):
        self.tokens = [BLANK] + list(characters or CHARACTERS)
        self._index = {t: i for i, t in enumerate(self.tokens)}

    blank_id = 0

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        """Ids of the characters of `text` (already normalised); TextError on any other."""
        try:
            return [self._index[c] for c in text]
        except KeyError:
            bad = sorted({c for c in text if c not in self._index})
            raise TextError(f"characters outside the vocabulary: {''.join(bad)!r} in {text!r}") from None

    def decode(self, ids) -> str:
        """Text of `ids` (blanks skipped, nothing collapsed: that is the decoder's job)."""
        return "".join(self.tokens[i] for i in ids if i != self.blank_id)
