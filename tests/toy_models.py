"""Tiny Linen models for the core tests: plain Dense, DenseGeneral, and an nn.scan stack."""
import flax.linen as nn
import jax.numpy as jnp


class Block(nn.Module):
    width: int = 16

    @nn.compact
    def __call__(self, x, _=None):
        h = nn.Dense(self.width, name="q_proj")(x)
        h = nn.Dense(self.width, name="v_proj")(jnp.tanh(h))
        return x + nn.Dense(self.width, use_bias=False, name="o_proj")(h), None


class DenseNet(nn.Module):
    """Dense layers and an output head `lm_head`."""

    width: int = 16
    vocab: int = 12

    @nn.compact
    def __call__(self, x):
        x, _ = Block(self.width, name="block")(x)
        return nn.Dense(self.vocab, name="lm_head")(x)


class GeneralNet(nn.Module):
    """DenseGeneral with a multi-axis output `[d] -> [heads, head_dim]` and a 2-axis input."""

    @nn.compact
    def __call__(self, x):
        h = nn.DenseGeneral((4, 3), name="qkv")(x)                  # [B, 4, 3]
        return nn.DenseGeneral(5, axis=(-2, -1), name="out")(jnp.tanh(h))


class NestedScanNet(nn.Module):
    """A scan of scans: kernels `[outer, inner, in, out]`, which no tree-only rule can read."""

    width: int = 16

    @nn.compact
    def __call__(self, x):
        outer = nn.scan(_InnerStack, variable_axes={"params": 0}, split_rngs={"params": True},
                        length=3)
        return outer(self.width, name="outer")(x, None)[0]


class _InnerStack(nn.Module):
    width: int = 16

    @nn.compact
    def __call__(self, x, _=None):
        inner = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                        length=2)
        return inner(self.width, name="inner")(x, None)


class ScanNet(nn.Module):
    """`n_layers` Blocks under nn.scan: every leaf has a leading layer axis."""

    width: int = 16
    n_layers: int = 3

    @nn.compact
    def __call__(self, x):
        stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True,
                                                                       "dropout": True},
                        length=self.n_layers)
        x, _ = stack(self.width, name="layers")(x, None)
        return nn.Dense(8, name="lm_head")(x)
