"""asr: BiLSTM-CTC speech recognition, from audio to WER.

    import asr
    model = asr.load_model("exp/demo/best.pt")
    model.transcribe("speech.flac")                      # a file
    model.transcribe(samples, sample_rate=44100)         # or a waveform array
"""

from asr.errors import ASRError, AudioError, ConfigError, ManifestError, ModelFileError, TextError
from asr.transcribe import Transcriber, load_model

__all__ = ["load_model", "Transcriber", "ASRError", "AudioError", "ConfigError", "ManifestError",
           "ModelFileError", "TextError"]
__version__ = "0.1.0"
