"""Audio front end: 16 kHz mono waveform -> Whisper-style 128-bin log-mel for a fixed window.

Matches transformers' ``WhisperFeatureExtractor`` (the reference): periodic Hann window of 400
samples, hop 160, reflect-padded centred STFT, power spectrum, Slaney mel filter bank
(0-8 kHz), log10 with a 1e-10 floor, clamp to (max - 8), then (x + 4) / 4. Audio shorter than
the window is zero-padded; longer audio is refused (the exported encoder has a static window).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import ExportError

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160


@dataclass(frozen=True)
class AudioPreprocessing:
    frames: int  # log-mel frames of the window (10 ms each)
    mel_bins: int = 128
    sample_rate: int = SAMPLE_RATE
    n_fft: int = N_FFT
    hop_length: int = HOP

    @property
    def samples(self) -> int:
        return self.frames * self.hop_length

    @property
    def seconds(self) -> float:
        return self.samples / self.sample_rate

    def to_json(self) -> dict:
        return asdict(self)


def _hz_to_mel(f):
    f = np.asarray(f, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, f / f_sp)


def _mel_to_hz(m):
    m = np.asarray(m, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_filter_bank(mel_bins: int, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Slaney-scale, Slaney-normalised triangular filters: [n_fft // 2 + 1, mel_bins]."""
    fft_freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    mel_pts = np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2), mel_bins + 2)
    hz_pts = _mel_to_hz(mel_pts)
    diff = np.diff(hz_pts)
    slopes = hz_pts[None, :] - fft_freqs[:, None]
    down = -slopes[:, :-2] / diff[:-1]
    up = slopes[:, 2:] / diff[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    filters *= 2.0 / (hz_pts[2 : mel_bins + 2] - hz_pts[:mel_bins])
    return filters


def log_mel(wave: np.ndarray, cfg: AudioPreprocessing) -> np.ndarray:
    """float32 [mel_bins, frames] for a mono 16 kHz waveform of at most the window's length."""
    x = np.zeros(cfg.samples, dtype=np.float64)
    x[: len(wave)] = wave
    x = np.pad(x, (cfg.n_fft // 2, cfg.n_fft // 2), mode="reflect")
    window = np.hanning(cfg.n_fft + 1)[:-1]
    n = 1 + (len(x) - cfg.n_fft) // cfg.hop_length
    idx = np.arange(cfg.n_fft)[None, :] + cfg.hop_length * np.arange(n)[:, None]
    power = np.abs(np.fft.rfft(x[idx] * window, axis=-1)) ** 2  # [frames + 1, bins]
    mel = power @ mel_filter_bank(cfg.mel_bins, cfg.n_fft, cfg.sample_rate)
    spec = np.log10(np.maximum(mel, 1e-10)).T[:, :-1]  # Whisper drops the last frame
    spec = np.maximum(spec, spec.max() - 8.0)
    return ((spec + 4.0) / 4.0).astype(np.float32)


def load_audio(path: str | Path, cfg: AudioPreprocessing) -> np.ndarray:
    """Read WAV/FLAC/OGG (libsndfile), mix to mono, resample to 16 kHz; check it fits the window."""
    p = Path(path)
    if not p.is_file():
        raise ExportError("audio file not found", file=p, fix="pass an existing WAV or FLAC file with --audio")
    return decode_audio(str(p), cfg, file=p)


def decode_audio(source, cfg: AudioPreprocessing, *, file=None, field: str | None = None) -> np.ndarray:
    """``load_audio`` of a path, an open binary file or bytes (a request's data URL)."""
    import io

    import soundfile as sf

    p = file
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    try:
        data, rate = sf.read(source, dtype="float32", always_2d=True)
    except (RuntimeError, sf.LibsndfileError, TypeError) as e:
        raise ExportError(
            f"cannot read audio ({str(e).splitlines()[0][:80] if str(e) else type(e).__name__})",
            file=p,
            field=field,
            fix="pass a WAV, FLAC or OGG file",
        ) from None
    if not np.isfinite(data).all():  # float WAVs can carry NaN/inf; the encoder would turn them into garbage
        raise ExportError(
            "audio holds non-finite samples",
            file=p,
            field=field,
            expected="finite samples",
            got=f"{int((~np.isfinite(data)).sum()):,} NaN or infinite of {data.size:,}",
            fix="re-encode the recording (e.g. as 16-bit PCM WAV)",
        )
    wave = data.mean(axis=1)
    if wave.size == 0 or not np.any(wave):
        raise ExportError("audio is empty or silent", file=p, field=field, fix="pass a recording with sound in it")
    if rate != cfg.sample_rate:
        from math import gcd

        from scipy.signal import resample_poly

        g = gcd(rate, cfg.sample_rate)
        wave = resample_poly(wave, cfg.sample_rate // g, rate // g).astype(np.float32)
    if len(wave) > cfg.samples:
        raise ExportError(
            "audio is longer than the bundle's audio window",
            file=p,
            field=field,
            expected=f"at most {cfg.seconds:.2f} s",
            got=f"{len(wave) / cfg.sample_rate:.2f} s",
            fix="trim the recording, or export with a larger shapes.audio_seconds in the recipe",
        )
    return wave
