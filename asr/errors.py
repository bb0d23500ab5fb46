"""The package's own exceptions: the library raises them, the command line reports them.

Every message names the file (or config key) and says what is wrong, so the CLI can print
it as one line and go on with the other inputs.
"""


class ASRError(Exception):
    """Base class of every error `asr` raises on bad input."""


class AudioError(ASRError):
    """An audio file is missing, unreadable, empty or otherwise unusable."""


class ManifestError(ASRError):
    """A manifest line is malformed or points at unusable data."""


class TextError(ASRError):
    """A transcript holds characters the tokenizer cannot encode."""


class ConfigError(ASRError):
    """A config file or `key=value` override is invalid."""


class ModelFileError(ASRError):
    """A model file is missing, truncated, foreign or of an unknown format version."""


class LMError(ASRError):
    """An ARPA or lexicon file is missing, unreadable or malformed, or an LM cannot be estimated."""
