"""Parity figures: SQNR (dB), cosine similarity, max-abs error."""

from __future__ import annotations

import math

import numpy as np


def compare(reference, test) -> dict:
    ref = np.asarray(reference, dtype=np.float64).reshape(-1)
    out = np.asarray(test, dtype=np.float64).reshape(-1)
    if ref.shape != out.shape:
        raise ValueError(f"shape mismatch {ref.shape} vs {out.shape}")
    err = ref - out
    signal, noise = float(np.sum(ref * ref)), float(np.sum(err * err))
    finite = bool(np.all(np.isfinite(out)))
    denom = float(np.linalg.norm(ref) * np.linalg.norm(out))
    return {
        # None when bit-exact (infinite SQNR) or when the output holds NaN/inf (never passes)
        "sqnr_db": round(10 * math.log10(signal / noise), 3) if finite and noise > 0 and signal > 0 else None,
        "bit_exact": finite and noise == 0.0,
        "cosine": round(float(ref @ out) / denom, 7) if finite and denom else 0.0,
        "max_abs": float(np.max(np.abs(err))) if finite else None,
        "finite": finite,
    }


def passes(figures: dict, threshold_db: float) -> bool:
    if not figures["finite"]:
        return False
    return figures["bit_exact"] or (figures["sqnr_db"] is not None and figures["sqnr_db"] >= threshold_db)
