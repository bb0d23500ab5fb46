import pytest

from asr.errors import TextError
from asr.text import BLANK, CHARACTERS, CharTokenizer, normalize_text


@pytest.mark.parametrize("raw, expected", [
    ("Don\u2019t  stop\u2014Caf\u00e9, 2 times!", "DON'T STOP CAFE TIMES"),  # the docstring's example
    ("Hello, world!", "HELLO WORLD"),
    ("U.S. troops", "US TROOPS"),  # punctuation glues to nothing
    ("well-known co\u2013operation", "WELL KNOWN CO OPERATION"),  # hyphen and en dash break words
    ("and/or snake_case", "AND OR SNAKE CASE"),
    ("na\u00efve r\u00e9sum\u00e9 \u00c5ngstr\u00f6m", "NAIVE RESUME ANGSTROM"),  # accents folded
    ("room 101 is empty", "ROOM IS EMPTY"),  # digits dropped
    ("2024", ""),
    ("\u2018Tis the season", "'TIS THE SEASON"),  # curly apostrophe that elides is kept
    ("it\u2019s the farmer\u2018s", "IT'S THE FARMER'S"),
    ("he said 'hello' to me", "HE SAID HELLO TO ME"),  # quotes stripped
    ("\"Quoted,\" she said.", "QUOTED SHE SAID"),
    ("the farmers' market", "THE FARMERS' MARKET"),  # plural possessive kept
    ("THE FARMERS' MARKET", "THE FARMERS' MARKET"),
    ("rock `n\u00b4 roll", "ROCK N ROLL"),  # backtick and acute accent are apostrophes, then quotes
    ("   many    spaces   ", "MANY SPACES"),
    ("caf\u00e9\u00a0noir", "CAFE NOIR"),  # no-break space is a space
    ("", ""),
    ("?!.,;:", ""),
])
def test_normalize_text(raw, expected):
    assert normalize_text(raw) == expected


@pytest.mark.parametrize("raw", ["Don\u2019t  stop\u2014Caf\u00e9, 2 times!", "the farmers' market",
                                 "'Tis 'quoted' text", "a--b"])
def test_normalize_text_is_idempotent(raw):
    once = normalize_text(raw)
    assert normalize_text(once) == once


def test_normalize_text_treats_any_whitespace_as_a_word_break():
    assert normalize_text("hello\tworld\nagain\r\nand again") == "HELLO WORLD AGAIN AND AGAIN"


def test_normalized_text_only_uses_the_tokenizer_alphabet():
    text = normalize_text("Ça m'a coûté 3€ — «très» cher; naïve façade & co.")
    assert set(text) <= set(CHARACTERS)
    assert text == "CA M'A COUTE TRES CHER NAIVE FACADE CO"


def test_tokenizer_layout():
    tok = CharTokenizer()
    assert len(tok) == 29
    assert tok.blank_id == 0 and tok.tokens[0] == BLANK
    assert tok.tokens[1:] == [" ", "'"] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    assert tok.encode(" 'AZ") == [1, 2, 3, 28]
    assert tok.encode("") == []


def test_tokenizer_round_trips_every_character():
    tok = CharTokenizer()
    text = "".join(CHARACTERS)
    ids = tok.encode(text)
    assert ids == list(range(1, 29))
    assert tok.decode(ids) == text
    sentence = "IT'S THE FARMERS' MARKET"
    assert tok.decode(tok.encode(sentence)) == sentence


def test_tokenizer_decode_skips_blanks_but_does_not_collapse():
    tok = CharTokenizer()
    a, b = tok.encode("AB")
    assert tok.decode([0, a, a, 0, b, 0]) == "AAB"


def test_tokenizer_names_the_bad_characters():
    tok = CharTokenizer()
    with pytest.raises(TextError) as err:
        tok.encode("HELLO, World1")
    message = str(err.value)
    assert "',1dlor'" in message  # every offending character, once, sorted
    assert "HELLO, World1" in message


def test_tokenizer_with_its_own_alphabet():
    tok = CharTokenizer(["a", "b", " "])
    assert tok.tokens == [BLANK, "a", "b", " "]
    assert tok.encode("ab ba") == [1, 2, 3, 2, 1]
    with pytest.raises(TextError, match="'c'"):
        tok.encode("abc")
