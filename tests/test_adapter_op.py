"""`lora_jax.adapter_op`, the one adapter op: its halves against the hand computation
`scale * dropout(x) @ A @ B`, its dropout switch, and its dtype rule.

Tolerance: float32, 1e-6 relative (the same few dots in another order at most).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax import adapter_op as op

TOL = dict(rtol=1e-6, atol=1e-6)
RATE = 0.5


def _operands(in_shape=(4, 5, 6), r=3, out=7):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(in_shape).astype(np.float32)
    a = rng.standard_normal((in_shape[-1], r)).astype(np.float32)
    b = rng.standard_normal((r, out)).astype(np.float32)
    return x, a, b, np.float32(0.75)


class _Layer(nn.Module):
    """A layer adding its adapter with `adapt`, the way the sharded layers do (no interceptor)."""

    @nn.compact
    def __call__(self, x, a, b, scale):
        return op.adapt(self, x, jnp.zeros(x.shape[:-1] + b.shape[-1:]), op.Adapter(a, b, scale),
                        in_axes=(x.ndim - 1,), dtype=jnp.float32)


def test_halves_equal_the_hand_computation():
    x, a, b, scale = _operands()
    h = op.adapter_in(x, a, scale, dtype=jnp.float32)
    assert h.shape == (4, 5, 3)
    np.testing.assert_allclose(h, scale * x @ a, **TOL)
    np.testing.assert_allclose(op.adapter_out(h, b, jnp.float32), scale * x @ a @ b, **TOL)
    delta = lj.lora_delta(x, a, b, scale, (2,), jnp.float32)  # the public name is the op's
    np.testing.assert_allclose(delta, scale * x @ a @ b, **TOL)


def test_input_half_contracts_any_input_axes():
    """DenseGeneral-style: x [B, in0, S, in1] contracted on axes (1, 3) with A [in0, in1, r]."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 5, 4)).astype(np.float32)
    a = rng.standard_normal((3, 4, 2)).astype(np.float32)
    h = op.adapter_in(x, a, 2.0, dtype=jnp.float32, in_axes=(1, 3))
    np.testing.assert_allclose(h, 2.0 * np.einsum("bisj,ijr->bsr", x, a), **TOL)


def test_gather_runs_before_the_scale_and_name():
    x, a, _, scale = _operands()
    h = op.adapter_in(x, a, scale, dtype=jnp.float32, gather=lambda t: jnp.concatenate([t, t]))
    np.testing.assert_allclose(h, np.concatenate([scale * x @ a] * 2), **TOL)


def test_dropout_off_outside_apply_and_when_deterministic():
    x, a, b, scale = _operands()
    key = {"dropout": jax.random.key(3)}
    want = scale * x @ a @ b
    np.testing.assert_allclose(_Layer().apply({}, x, a, b, scale, rngs=key), want, **TOL)
    with op.dropout_context(RATE, deterministic=True):
        np.testing.assert_allclose(_Layer().apply({}, x, a, b, scale, rngs=key), want, **TOL)


def test_dropout_on_equals_the_hand_computation_with_the_same_mask():
    """One `make_rng("dropout")` in the layer's scope, a Bernoulli(1 - rate) mask over x,
    kept entries scaled by 1 / (1 - rate), then `scale * x @ A @ B`."""
    x, a, b, scale = _operands()
    key = jax.random.key(3)
    with op.dropout_context(RATE, deterministic=False) as config:
        assert config.active and op.current_dropout() == config
        got = _Layer().apply({}, x, a, b, scale, rngs={"dropout": key})
    assert not op.current_dropout().active  # reset on exit
    layer_key = _Layer().apply({}, method=lambda m: m.make_rng("dropout"),
                               rngs={"dropout": key})
    keep = np.asarray(jax.random.bernoulli(layer_key, 1.0 - RATE, x.shape))
    assert 0.3 < keep.mean() < 0.7
    dropped = np.where(keep, x / (1.0 - RATE), 0.0)
    np.testing.assert_allclose(got, scale * dropped @ a @ b, **TOL)
    assert np.abs(got - scale * x @ a @ b).max() > 1e-3  # the mask acted


def test_apply_sets_the_rate_the_op_reads():
    """`lj.apply(lora_dropout=)` is the one place the rate is given."""
    x, a, b, scale = _operands()
    seen = []

    class Probe(nn.Module):
        @nn.compact
        def __call__(self, x):
            seen.append(op.current_dropout())
            return x

    lj.apply(Probe(), {}, x, rngs={"dropout": jax.random.key(0)}, deterministic=False,
             lora_dropout=0.25)
    lj.apply(Probe(), {}, x)
    assert seen == [op.Dropout(rate=0.25, deterministic=False), op.Dropout()]


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_adapters_run_in_the_layer_compute_dtype(dtype):
    x = jnp.ones((2, 4), jnp.bfloat16)
    kernel = jnp.ones((4, 3), jnp.float32)
    want = jnp.result_type(x, kernel) if dtype is None else dtype
    assert op.compute_dtype(dtype, x, kernel) == want
    a, b = jnp.ones((4, 2), jnp.float32), jnp.ones((2, 3), jnp.float32)
    y = jnp.zeros((2, 3), jnp.bfloat16)
    h = op.adapter_in(x, a, 1.0, dtype=jnp.bfloat16)
    assert h.dtype == jnp.bfloat16
    assert op.add_delta(y, op.adapter_out(h, b, jnp.float32)).dtype == jnp.bfloat16
