"""Vocabulary-parallel cross-entropy equals the plain one (`models.loss.cross_entropy` on whole
logits), in value and in its gradient with respect to the hidden states.

Tolerance: float32 1e-5 (tests/sharding_common.py): the sharded loss only regroups the
log-sum-exp over vocabulary slices and the mean over batch slices.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from models.loss import cross_entropy
from sharding import BATCH_AXES, shard_params
from sharding.loss import shift_labels, vocab_parallel_cross_entropy
from tests.sharding_common import TOL, assert_trees_close, mesh_of, run_fast

B, S, D, V = 8, 16, 32, 256


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((B, S, D)).astype(np.float32)
    kernel = (rng.standard_normal((D, V)) / np.sqrt(D)).astype(np.float32)
    ids = rng.integers(0, V, (B, S)).astype(np.int32)
    ids[0, :5] = -100                                    # ignored labels
    mask = (rng.random((B, S)) > 0.2).astype(np.int32)   # and masked positions
    return hidden, kernel, ids, mask


@pytest.mark.parametrize("layout", [(1, 1, 4, True), (1, 1, 2, False), (2, 2, 2, True),
                                    (8, 1, 1, False)])
def test_matches_cross_entropy_on_whole_logits(data, layout):
    hidden, kernel, ids, mask = data
    dp, fsdp, tp, sp = layout
    mesh = mesh_of(dp, fsdp, tp)

    def plain(h):
        return cross_entropy(h @ kernel, ids, mask, shift=True)

    def sharded(h, k):
        # the mask is aligned with the labels, so it shifts with them
        return vocab_parallel_cross_entropy(h, k, shift_labels(ids), shift_labels(mask, 0),
                                            mesh=mesh, sequence_parallel=sp, chunk_size=16)

    want = jax.jit(jax.value_and_grad(plain))(hidden)
    rows = NamedSharding(mesh, P(BATCH_AXES, "tp" if sp else None))
    kernel_s = shard_params({"lm_head": {"kernel": kernel}}, mesh)["lm_head"]["kernel"]
    got = run_fast(jax.value_and_grad(sharded), jax.device_put(hidden, rows), kernel_s)
    assert_trees_close(got, want, **TOL)


def test_chunk_must_divide_the_local_vocabulary(data):
    hidden, kernel, ids, _ = data
    with pytest.raises(ValueError, match="chunk_size 24 does not divide the 64 vocabulary"):
        vocab_parallel_cross_entropy(jnp.asarray(hidden), jnp.asarray(kernel), ids,
                                     mesh=mesh_of(tp=4), chunk_size=24)
