"""The GRU autoencoder network of the sequence family: per-minute channels in, the same out.

Only the network lives here; the training system (loss, steps, optimiser) is
`models.sequence`'s Lightning module, and `models.sequence` imports this module lazily
because importing torch costs seconds.

The recurrence runs over *patches* of ``patch_minutes`` consecutive minutes (12 steps of 5
minutes for an hour) rather than over single minutes: on a CPU a GRU's cost is its number
of sequential steps, and 60 steps put one sequence near a millisecond, over the scoring
endpoint's budget. The decoder still reconstructs every minute of every channel.
"""

from __future__ import annotations

import torch
from torch import nn


class SequenceAutoencoder(nn.Module):
    """Encoder GRU -> latent vector -> decoder GRU -> per-minute reconstruction.

    Args:
        n_channels: channels per minute.
        n_minutes: minutes per sequence, a multiple of ``patch_minutes``.
        patch_minutes: consecutive minutes one recurrent step reads and writes.
        hidden_size: width of both GRUs' hidden state.
        latent_size: width of the bottleneck between encoder and decoder.

    Example:
        >>> net = SequenceAutoencoder(n_channels=5, n_minutes=60, patch_minutes=5,
        ...                           hidden_size=16, latent_size=4)
        >>> tuple(net(torch.zeros(3, 60, 5)).shape)
        (3, 60, 5)
    """

    def __init__(
        self,
        n_channels: int,
        n_minutes: int,
        patch_minutes: int,
        hidden_size: int,
        latent_size: int,
    ) -> None:
        super().__init__()
        if n_minutes % patch_minutes:
            raise ValueError(f"{n_minutes} minutes do not split into patches of {patch_minutes}")
        self.n_channels = n_channels
        self.n_minutes = n_minutes
        self.patch_minutes = patch_minutes
        self.n_steps = n_minutes // patch_minutes
        patch_width = patch_minutes * n_channels
        self.encoder = nn.GRU(patch_width, hidden_size, batch_first=True)
        self.to_latent = nn.Linear(hidden_size, latent_size)
        self.from_latent = nn.Linear(latent_size, hidden_size)
        self.decoder = nn.GRU(latent_size, hidden_size, batch_first=True)
        self.to_patch = nn.Linear(hidden_size, patch_width)

    def encode(self, sequences: torch.Tensor) -> torch.Tensor:
        """The latent vector of each sequence (batch x minutes x channels -> batch x latent)."""
        patches = sequences.reshape(len(sequences), self.n_steps, -1)
        _, last = self.encoder(patches)
        return torch.tanh(self.to_latent(last[0]))

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """The reconstructed sequences (batch x latent -> batch x minutes x channels)."""
        hidden = torch.tanh(self.from_latent(latent)).unsqueeze(0).contiguous()
        # The latent vector is the decoder's input at every step and its first state.
        steps = latent.unsqueeze(1).expand(-1, self.n_steps, -1)
        out, _ = self.decoder(steps, hidden)
        return self.to_patch(out).reshape(len(latent), self.n_minutes, self.n_channels)

    def forward(self, sequences: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(sequences))
