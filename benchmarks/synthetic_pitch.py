"""A seeded pitch-estimation set: one audio frame, which of 360 pitch bins its tone is in.

Each sample is 1024 samples of 16 kHz audio (64 ms) holding a harmonic tone: its
fundamental drawn uniformly in cents over CREPE's range (Kim et al. 2018: 360 bins 20 cents
apart, from 32.7 Hz to 1975.5 Hz), one to ten harmonics below the Nyquist frequency with
random, decaying amplitudes and phases, a slow amplitude envelope and a little vibrato,
in white noise 0 to 30 dB below it. Each frame is normalised to zero mean and unit standard
deviation, as CREPE's are. The label is the bin nearest the fundamental; a prediction is
right when its bin lies within 50 cents of the label's (two bins either side: raw pitch
accuracy on bin centres). Nothing is downloaded: the same seed gives the same frames on
every machine.

    frames, bins = make(8000, seed=0)   # float32 (N, 1024), int64 (N,)
"""

from __future__ import annotations

import numpy as np
import torch

RATE = 16_000
FRAME = 1024
BINS = 360
CENTS_PER_BIN = 20.0
FIRST_BIN_CENTS = 1997.3794084376191  # cents above 10 Hz: 32.70 Hz (CREPE's first bin)


def cents_of_bins(bins: torch.Tensor) -> torch.Tensor:
    """Each bin's centre, in cents above 10 Hz."""
    return FIRST_BIN_CENTS + CENTS_PER_BIN * bins.double()


def make(count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` frames and their bins, float32 ``(count, 1024)`` and int64 ``(count,)``."""
    rng = np.random.default_rng(seed)
    cents = FIRST_BIN_CENTS + rng.uniform(-CENTS_PER_BIN / 2, CENTS_PER_BIN * (BINS - 0.5),
                                          count)
    f0 = 10.0 * 2.0 ** (cents / 1200.0)
    t = np.arange(FRAME) / RATE
    frames = np.empty((count, FRAME), np.float32)
    for i in range(count):
        vibrato = 1.0 + 0.004 * np.sin(2 * np.pi * rng.uniform(3, 7) * t + rng.uniform(0, 6.3))
        phase = 2 * np.pi * np.cumsum(f0[i] * vibrato) / RATE
        harmonics = int(min(rng.integers(1, 11), (RATE / 2) // f0[i]))
        decay = rng.uniform(0.3, 0.9)
        tone = sum(decay ** k * rng.uniform(0.3, 1.0) * np.sin((k + 1) * phase
                                                                + rng.uniform(0, 6.3))
                   for k in range(harmonics))
        envelope = 1.0 + rng.uniform(-0.5, 0.5) * t / t[-1]
        signal = tone * envelope
        noise = rng.normal(0, 1, FRAME) * signal.std() * 10 ** (-rng.uniform(0, 30) / 20)
        frame = signal + noise
        frames[i] = (frame - frame.mean()) / max(frame.std(), 1e-8)
    bins = np.clip(np.rint((cents - FIRST_BIN_CENTS) / CENTS_PER_BIN), 0, BINS - 1)
    return torch.from_numpy(frames), torch.from_numpy(bins.astype(np.int64))


def pitch_accuracy(logits: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """Per frame: whether the predicted bin lies within 50 cents of the label's bin."""
    predicted = cents_of_bins(logits.argmax(1))
    return (predicted - cents_of_bins(bins)).abs() <= 50.0
