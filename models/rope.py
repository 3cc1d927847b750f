"""Rotary position embeddings: plain RoPE and the Llama 3.1 frequency scaling.

The "rotate half" layout of Hugging Face Llama checkpoints: a head vector [h] is split into two
halves (x1, x2) that rotate together, not interleaved pairs.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_ROPE_TYPES = ("default", "llama3")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """HF `rope_scaling` with `rope_type: "llama3"` (Llama 3.1 / 3.2)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    rope_type: str = "llama3"

    @classmethod
    def from_hf(cls, d: Mapping[str, Any] | None) -> "RopeScaling | None":
        """Parse an HF `rope_scaling` / `rope_parameters` dict; None or "default" -> None."""
        if not d:
            return None
        kind = d.get("rope_type", d.get("type", "default"))
        if kind == "default":
            return None
        if kind != "llama3":
            raise ValueError(f"rope_scaling type {kind!r} is not supported; supported: "
                             f"{SUPPORTED_ROPE_TYPES}")
        return cls(factor=float(d["factor"]), low_freq_factor=float(d["low_freq_factor"]),
                   high_freq_factor=float(d["high_freq_factor"]),
                   original_max_position_embeddings=int(d["original_max_position_embeddings"]))

    def to_hf(self) -> dict:
        return dataclasses.asdict(self)


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """Per-pair inverse frequencies [head_dim // 2], float32, computed as transformers does
    (in float32) so positions rotate by the same angles."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv = (np.float32(1.0) / np.power(np.float32(theta), exponents)).astype(np.float32)
    return inv if scaling is None else _llama3_scale(inv, scaling)


def _llama3_scale(inv: np.ndarray, s: RopeScaling) -> np.ndarray:
    """Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth blend between."""
    wavelen = np.float32(2 * math.pi) / inv
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    scaled = np.where(wavelen > low_wavelen, inv / np.float32(s.factor), inv)
    smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
              / (s.high_freq_factor - s.low_freq_factor)).astype(np.float32)
    blended = (1 - smooth) * scaled / np.float32(s.factor) + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, blended, scaled).astype(np.float32)


def rope_angles(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape [B, T, head_dim] (float32) for integer positions [B, T]."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [B, T, heads, h] by cos/sin [B, T, h], in float32; returns x's dtype."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x32 * cos + rotated * sin).astype(x.dtype)
