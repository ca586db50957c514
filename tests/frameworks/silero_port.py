"""A PyTorch port of silero-vad's 16 kHz model (v5/v6), written from its ONNX graph (`silero_vad_16k_op15.onnx`):
the target the ONNX weights are transferred into. Nothing of silero-vad's own code is used.

The graph, read node by node:
- `stft`: the input `(B, T)` (T = 64 samples of context + 512 new ones) reflect-padded by 64 on the right, one
  channel, convolved with `forward_basis_buffer` `(258, 1, 256)` at stride 128 (an STFT as a conv: 129 real rows,
  then 129 imaginary ones), and the magnitude `sqrt(re^2 + im^2)` taken: `(B, 129, frames)`;
- `encoder`: four blocks of `reparam_conv` (Conv1d, kernel 3, padding 1, strides 1, 2, 2, 1) and a ReLU;
- `decoder`: an LSTM cell (`rnn`, 128 units) on the single remaining frame, its state `(2, B, 128)` in and out,
  then `Dropout, ReLU, Conv1d(128, 1, 1), Sigmoid`, averaged over time: `(B, 1)`, the speech probability.

Module names follow the ONNX file's (its initializers keep silero's PyTorch keys, under a `model.` wrapper this
port does not have).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

#: Samples per call at 16 kHz: 64 of context (the end of the previous chunk) and 512 new ones.
CONTEXT, CHUNK = 64, 512


class STFT(nn.Module):
    def __init__(self, n_fft: int = 256, hop: int = 128) -> None:
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        self.register_buffer("forward_basis_buffer", torch.zeros(n_fft + 2, 1, n_fft))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x.unsqueeze(1), (0, self.n_fft // 4), mode="reflect")
        x = F.conv1d(x, self.forward_basis_buffer, stride=self.hop)
        cutoff = self.n_fft // 2 + 1
        return torch.sqrt(x[:, :cutoff] ** 2 + x[:, cutoff:] ** 2)


class EncoderBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.reparam_conv = nn.Conv1d(cin, cout, 3, stride=stride, padding=1)
        self.activation = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.reparam_conv(x))


class Decoder(nn.Module):
    def __init__(self, units: int = 128) -> None:
        super().__init__()
        self.rnn = nn.LSTMCell(units, units)
        self.decoder = nn.Sequential(nn.Dropout(0.1), nn.ReLU(), nn.Conv1d(units, 1, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, c = self.rnn(x.squeeze(-1), (state[0], state[1]))
        return self.decoder(h.unsqueeze(-1)), torch.stack([h, c])


class SileroVAD16k(nn.Module):
    """`forward(x (B, 576), state (2, B, 128) or None) -> (probability (B, 1), new state)`."""

    def __init__(self) -> None:
        super().__init__()
        self.stft = STFT()
        self.encoder = nn.Sequential(EncoderBlock(129, 128, 1), EncoderBlock(128, 64, 2),
                                     EncoderBlock(64, 64, 2), EncoderBlock(64, 128, 1))
        self.decoder = Decoder()

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if state is None:
            state = x.new_zeros(2, x.shape[0], 128)
        y, state = self.decoder(self.encoder(self.stft(x)), state)
        return y.squeeze(1).mean(dim=1, keepdim=True), state


def silero_vad_16k() -> SileroVAD16k:
    """The factory for `--model tests/frameworks/silero_port.py:silero_vad_16k`."""
    return SileroVAD16k().eval()
