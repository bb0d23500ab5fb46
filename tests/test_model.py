import math

import pytest
import torch

from asr.errors import ConfigError
from asr.features import N_MELS
from asr.model import BiLSTMCTC, ModelConfig, reverse_within_lengths

VOCAB = 29


def tiny(**overrides) -> BiLSTMCTC:
    values = dict(hidden_size=16, num_layers=2, conv_channels=4, dropout=0.0)
    values.update(overrides)
    return BiLSTMCTC(ModelConfig(**values), VOCAB).eval()


def padded(frames: list[int]) -> torch.Tensor:
    """(B, T, N_MELS) random features, zero past each utterance's length (as LogMel gives them)."""
    feats = torch.randn(len(frames), max(frames), N_MELS)
    for b, n in enumerate(frames):
        feats[b, n:] = 0
    return feats


@pytest.mark.parametrize("subsampling", [1, 2, 3, 4, 6, 8])
def test_output_shape_and_lengths(subsampling):
    model = tiny(subsampling=subsampling)
    frames = [100, 37, 8, 1]
    log_probs, lengths = model(padded(frames), torch.tensor(frames))
    assert log_probs.shape == (4, math.ceil(100 / subsampling), VOCAB)
    assert lengths.tolist() == [math.ceil(n / subsampling) for n in frames]
    assert model.output_lengths(torch.tensor(frames)).tolist() == lengths.tolist()
    # Log-probabilities: each frame's distribution sums to one.
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(4, log_probs.shape[1]))


@pytest.mark.parametrize("subsampling, frames, expected", [(2, 7, 4), (3, 7, 3), (4, 7, 2), (4, 9, 3), (4, 4, 1)])
def test_subsampled_length_is_a_ceiling(subsampling, frames, expected):
    log_probs, lengths = tiny(subsampling=subsampling)(torch.randn(1, frames, N_MELS), torch.tensor([frames]))
    assert lengths.item() == expected == log_probs.shape[1]


def test_gru_variant():
    model = tiny(rnn_type="gru", subsampling=2)
    assert all(isinstance(m, torch.nn.GRU) for m in [*model.rnn.forward_layers, *model.rnn.backward_layers])
    assert all(isinstance(m, torch.nn.LSTM) for m in [*tiny().rnn.forward_layers, *tiny().rnn.backward_layers])
    log_probs, lengths = model(padded([20, 11]), torch.tensor([20, 11]))
    assert log_probs.shape == (2, 10, VOCAB) and lengths.tolist() == [10, 6]
    assert model.num_parameters() < tiny(subsampling=2).num_parameters()  # 3 gates instead of 4


def test_parameter_count():
    model = tiny(num_layers=2)
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    h = 16
    assert model.rnn.forward_layers[0].weight_ih_l0.shape == (4 * h, h)  # an LSTM over the subsampled features
    assert model.rnn.backward_layers[1].weight_ih_l0.shape == (4 * h, 2 * h)  # reads both directions below
    assert model.output.weight.shape == (VOCAB, 2 * h)  # both directions feed the output


def zero_conv_biases(model: BiLSTMCTC) -> BiLSTMCTC:
    with torch.no_grad():
        for layer in model.subsampling.convs:
            if isinstance(layer, torch.nn.Conv2d):
                layer.bias.zero_()
    return model


@pytest.mark.parametrize("rnn_type", ["lstm", "gru"])
@pytest.mark.parametrize("subsampling", [2, 4])
def test_recurrent_layers_ignore_padding(rnn_type, subsampling):
    # With the convolutions' biases at zero, and 37 frames (odd) under stride 2, every
    # convolution output past the end sees only padding and stays zero: this isolates the
    # recurrent part, where packed sequences must keep the padding out of the backward pass.
    model = zero_conv_biases(tiny(rnn_type=rnn_type, subsampling=subsampling))
    feats = torch.randn(1, 37, N_MELS)
    alone, n = model(feats, torch.tensor([37]))
    batch = torch.cat([torch.cat([feats, torch.zeros(1, 23, N_MELS)], 1), torch.randn(1, 60, N_MELS)])
    together, lengths = model(batch, torch.tensor([37, 60]))
    assert lengths[0] == n
    torch.testing.assert_close(together[0, :n], alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("subsampling", [1, 2, 4])
def test_padded_and_unpadded_utterance_give_the_same_log_probs(subsampling):
    model = tiny(subsampling=subsampling)
    feats = torch.randn(1, 37, N_MELS)
    alone, n = model(feats, torch.tensor([37]))
    with_padding, lengths = model(torch.cat([feats, torch.zeros(1, 23, N_MELS)], 1), torch.tensor([37]))
    assert lengths.item() == n.item()
    torch.testing.assert_close(with_padding[0, :n], alone[0], atol=1e-5, rtol=0)


def test_dropout_only_in_training():
    model = tiny(dropout=0.5)
    feats, frames = padded([30, 20]), torch.tensor([30, 20])
    a, _ = model.eval()(feats, frames)
    b, _ = model(feats, frames)
    assert torch.equal(a, b)
    model.train()
    c, _ = model(feats, frames)
    assert not torch.allclose(a, c)


def test_gradients_reach_every_parameter():
    model = tiny(subsampling=2).train()
    log_probs, lengths = model(padded([40, 25]), torch.tensor([40, 25]))
    targets = torch.tensor([[3, 4, 5], [6, 7, 0]])
    loss = torch.nn.functional.ctc_loss(log_probs.transpose(0, 1), targets, lengths, torch.tensor([3, 2]))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("overrides, key", [
    ({"subsampling": 5}, "model.subsampling"),
    ({"subsampling": 0}, "model.subsampling"),
    ({"rnn_type": "transformer"}, "model.rnn_type"),
])
def test_invalid_config_raises(overrides, key):
    with pytest.raises(ConfigError, match=key):
        BiLSTMCTC(ModelConfig(**overrides), VOCAB)
    with pytest.raises(ConfigError, match=key):
        ModelConfig(**overrides).validate()


def test_reverse_within_lengths_by_hand():
    index = reverse_within_lengths(torch.tensor([3, 5, 1]), 5)
    assert index.tolist() == [[2, 1, 0, 3, 4], [4, 3, 2, 1, 0], [0, 1, 2, 3, 4]]
    x = torch.arange(15.0).reshape(3, 5)
    assert torch.equal(x.gather(1, index).gather(1, index), x)  # its own inverse


def test_lstm_forget_gate_bias_starts_at_one():
    model = tiny(num_layers=2)
    h = 16
    for layer in [*model.rnn.forward_layers, *model.rnn.backward_layers]:
        forget = layer.bias_ih_l0[h : 2 * h] + layer.bias_hh_l0[h : 2 * h]
        assert torch.equal(forget, torch.ones(h))
