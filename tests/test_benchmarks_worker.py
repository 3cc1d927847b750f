"""`benchmarks.jax_worker`'s configurations compute the same step: the unrolled stack
(scan=0, initialised scanned and unstacked) gives the scanned one's loss."""
import jax
import numpy as np
import optax

import lora_jax as lj
from benchmarks import jax_worker


def first_losses(variants: list[str], steps: int = 2) -> list[float]:
    opts = jax_worker.parse_variant(["attn=xla", *variants])  # cuDNN attention is GPU-only
    cfg, model, base, adapters = jax_worker.build("tiny", opts, batch=2, seq=32)
    tx = lj.optimizer(optax.adamw(1e-2), adapters)
    opt_state = tx.init(adapters)
    step = jax_worker.make_step(cfg, model, tx, opts)
    ids = jax.random.randint(jax.random.key(1), (2, 32), 0, cfg.vocab_size)
    losses = []
    for _ in range(steps):
        adapters, opt_state, loss = step(adapters, opt_state, base, ids)
        losses.append(float(loss))
    return losses


def test_unrolled_worker_trains_like_the_scanned_one():
    scanned, unrolled = first_losses([]), first_losses(["scan=0"])
    # bf16 compute: a loop body and an unrolled stack fuse differently (last-bit differences);
    # a wrong layer order or init would differ at O(1).
    np.testing.assert_allclose(unrolled, scanned, rtol=2e-3)
    assert unrolled[1] < unrolled[0]  # the step trains
