import librosa
import numpy as np
import pytest
import torch

from asr.features import (HOP_LENGTH, N_FFT, N_MELS, VTLP_KNEE_HZ, LogMel, SpecAugment, SpecAugmentConfig,
                          compute_stats, num_frames, warp_spectrum)
from conftest import noise, sine


def speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    """A tone with harmonics over noise: energy spread over the mel bands."""
    wave = sum(sine(f, seconds, amplitude=0.2 / k) for k, f in enumerate((220, 440, 1320, 3100), 1))
    return (wave + noise(seconds, amplitude=0.05, seed=seed)).astype(np.float32)


def batch_of(waves: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    tensors = [torch.from_numpy(w) for w in waves]
    return torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True), torch.tensor([len(w) for w in waves])


def test_frame_counts():
    assert HOP_LENGTH == 160
    for n in (1, 159, 160, 161, 16000, 12345):
        assert num_frames(n) == 1 + n // 160
    lengths = torch.tensor([16000, 12345, 800, 1])
    assert num_frames(lengths).tolist() == [101, 78, 6, 1]


def test_shapes_of_a_padded_batch():
    waves = [noise(1.0), noise(0.7715625, seed=1), noise(0.05, seed=2)]  # 16000, 12345, 800 samples
    batch, lengths = batch_of(waves)
    feats, frames = LogMel()(batch, lengths)
    assert feats.shape == (3, 101, N_MELS)
    assert feats.dtype == torch.float32
    assert frames.tolist() == [101, 78, 6]


def test_log_mel_matches_librosa():
    wave = speechlike(0.75)
    feats = LogMel().log_mel(torch.from_numpy(wave)[None])[0].numpy()
    mel = librosa.feature.melspectrogram(y=wave, sr=16000, n_fft=512, win_length=400, hop_length=160,
                                         n_mels=80)
    expected = np.log(mel + 1e-6).T  # (80, T) -> (T, 80)
    assert feats.shape == expected.shape == (1 + len(wave) // 160, 80)
    np.testing.assert_allclose(feats, expected, atol=1e-3)


def test_digital_silence_gives_the_log_floor():
    feats = LogMel().log_mel(torch.zeros(1, 1600))
    np.testing.assert_allclose(feats.numpy(), np.log(1e-6), rtol=1e-6)


def test_frames_past_the_end_are_zero():
    waves = [speechlike(1.0), speechlike(0.4, seed=1)]
    feats, frames = LogMel()(*batch_of(waves))
    assert frames.tolist() == [101, 41]
    assert torch.all(feats[1, 41:] == 0)
    assert torch.all(feats[1, :41].abs().sum(-1) > 0)
    assert torch.all(feats[0].abs().sum(-1) > 0)


def test_an_utterance_has_the_same_features_alone_and_in_a_batch():
    log_mel = LogMel()
    waves = [speechlike(1.0), speechlike(0.4, seed=1), speechlike(0.61, seed=2)]
    batched, frames = log_mel(*batch_of(waves))
    for i, wave in enumerate(waves):
        alone, n = log_mel(*batch_of([wave]))
        assert n.item() == frames[i].item() == alone.shape[1]
        torch.testing.assert_close(batched[i, :n], alone[0], atol=1e-4, rtol=0)


def test_stats_normalise_the_data_they_came_from():
    log_mel = LogMel()
    waves = [torch.from_numpy(speechlike(s, seed=i)) for i, s in enumerate((0.5, 1.0, 0.3))]
    mean, std = compute_stats(waves, log_mel)
    assert mean.shape == std.shape == (N_MELS,)
    # Against numpy on the concatenated frames of all utterances.
    frames = np.concatenate([log_mel.log_mel(w[None])[0].numpy() for w in waves]).astype(np.float64)
    np.testing.assert_allclose(mean.numpy(), frames.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(std.numpy(), frames.std(0), rtol=1e-4, atol=1e-5)

    log_mel.set_stats(mean, std)
    normalised = torch.cat([log_mel(w[None], torch.tensor([len(w)]))[0][0] for w in waves]).double()
    assert normalised.mean(0).abs().max() < 1e-3
    assert (normalised.std(0, unbiased=False) - 1).abs().max() < 1e-3


def test_stats_need_audio():
    with pytest.raises(ValueError):
        compute_stats([], LogMel())


def test_stats_travel_with_the_module():
    log_mel = LogMel()
    log_mel.set_stats(torch.full((N_MELS,), 2.0), torch.full((N_MELS,), 4.0))
    assert set(log_mel.state_dict()) >= {"mean", "std"}
    wave = torch.from_numpy(speechlike(0.2))[None]
    raw = log_mel.log_mel(wave)
    feats, _ = log_mel(wave, torch.tensor([wave.shape[1]]))
    torch.testing.assert_close(feats, (raw - 2.0) / 4.0)


def mask_of(out: torch.Tensor) -> torch.Tensor:
    return out == 0


BIN_HZ = 16000 / N_FFT  # 31.25 Hz


def peak_hz(power: torch.Tensor) -> float:
    """Frequency of the strongest bin of a (F, T) power spectrogram."""
    return float(power.sum(1).argmax()) * BIN_HZ


def test_vtlp_moves_a_tone_by_its_factor_below_the_knee_and_keeps_the_ends():
    log_mel = LogMel()
    waves = torch.from_numpy(np.stack([sine(1000, 0.5), sine(1000, 0.5), sine(1000, 0.5)]))
    power = log_mel.mel.spectrogram(waves)  # (3, 257, T)
    warped = warp_spectrum(power, torch.tensor([1.0, 1.1, 0.9]))
    assert torch.allclose(warped[0], power[0])
    assert peak_hz(power[0]) == 1000
    assert peak_hz(warped[1]) == pytest.approx(1100, abs=BIN_HZ)  # formants up: a shorter tract
    assert peak_hz(warped[2]) == pytest.approx(900, abs=BIN_HZ)
    # 0 Hz and Nyquist stay put; the map is monotone, so every bin reads from a bin in range.
    ramp = torch.arange(257, dtype=torch.float32)[None, :, None].expand(3, -1, 2)
    for f, row in zip((1.0, 1.1, 0.9), warp_spectrum(ramp, torch.tensor([1.0, 1.1, 0.9]))[:, :, 0]):
        assert row[0] == 0 and row[-1] == 256
        assert bool((row[1:] > row[:-1]).all())
        knee = int(VTLP_KNEE_HZ * min(f, 1) / BIN_HZ)  # below the knee, bin k reads bin k / f
        assert row[knee] == pytest.approx(knee / f, abs=1e-3)


def test_vtlp_in_log_mel_changes_only_the_warped_utterances():
    log_mel = LogMel()
    waves, lengths = batch_of([speechlike(0.6, seed=1), speechlike(0.6, seed=2)])
    plain, _ = log_mel(waves, lengths)
    warped, frames = log_mel(waves, lengths, torch.tensor([1.0, 1.08]))
    assert torch.allclose(warped[0], plain[0], atol=1e-5)
    assert (warped[1] - plain[1]).abs().mean() > 0.05
    assert torch.equal(frames, num_frames(lengths))


def test_spec_augment_is_identity_in_eval_mode_and_when_disabled():
    feats, frames = torch.randn(2, 50, N_MELS), torch.tensor([50, 30])
    aug = SpecAugment(SpecAugmentConfig()).eval()
    assert torch.equal(aug(feats, frames), feats)
    off = SpecAugment(SpecAugmentConfig(enabled=False)).train()
    for _ in range(5):
        assert torch.equal(off(feats, frames), feats)


def test_spec_augment_masks_whole_bands_and_spans():
    config = SpecAugmentConfig(freq_masks=2, freq_width=10, time_masks=2, time_width=0.1)
    aug = SpecAugment(config).train()
    frames = torch.tensor([200, 150, 60, 1])
    masked_bins = masked_steps = 0
    for _ in range(20):
        out = aug(torch.ones(4, 200, N_MELS), frames)
        assert set(out.unique().tolist()) <= {0.0, 1.0}
        for b, n in enumerate(frames.tolist()):
            zero = mask_of(out[b])  # (T, F)
            bands = zero.all(dim=0)  # bins zeroed at every step
            spans = zero.all(dim=1)  # steps zeroed in every bin
            # Every zero is part of a whole band or a whole span: nothing else is touched.
            assert torch.equal(zero, bands[None, :] | spans[:, None])
            assert bands.sum() <= config.freq_masks * config.freq_width
            assert spans.sum() <= config.time_masks * int(n * config.time_width)
            assert not spans[n:].any(), "a time mask fell past the utterance's end"
            masked_bins += int(bands.sum())
            masked_steps += int(spans.sum())
    assert masked_bins > 0 and masked_steps > 0


def test_spec_augment_single_masks_are_contiguous():
    aug = SpecAugment(SpecAugmentConfig(freq_masks=1, freq_width=27, time_masks=1, time_width=0.2)).train()
    seen = 0
    for _ in range(20):
        zero = mask_of(aug(torch.ones(1, 100, N_MELS), torch.tensor([100]))[0])
        for line in (zero.all(dim=0), zero.all(dim=1)):
            where = line.nonzero().flatten()
            if len(where):
                seen += 1
                assert where[-1] - where[0] + 1 == len(where)  # one run, no gaps
    assert seen > 0


def test_spec_augment_is_seeded():
    aug = SpecAugment(SpecAugmentConfig()).train()
    feats, frames = torch.randn(3, 80, N_MELS), torch.tensor([80, 70, 40])
    torch.manual_seed(5)
    a = aug(feats, frames)
    torch.manual_seed(5)
    b = aug(feats, frames)
    assert torch.equal(a, b)
