"""Training parity with PyTorch + PEFT: from the same base and adapter weights and the same
batches, 20 AdamW steps on the adapters give per-step losses within 1e-5 relative in float32
(the project's float32 parity threshold). Same optimizer on both sides, every hyper-parameter
explicit (optax.adamw and torch.optim.AdamW differ in default weight decay), torch in eval mode
(no dropout), mean token cross-entropy with shifted labels on both sides."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch

import lora_jax as lj
import models
from tests.test_models_fixtures import VOCAB
from tests.test_peft import (checkpoints, lora_config, random_adapters,  # noqa: F401
                             torch_model)

# A moderate learning rate: at 1e-2 the tiny models' training turns chaotic and amplifies the
# two implementations' float32 rounding differences (1e-7 per step) past 1e-4 within 20 steps.
STEPS, LR, BETAS, EPS, WEIGHT_DECAY = 20, 3e-3, (0.9, 0.999), 1e-8, 0.01
RTOL = 1e-5


def batch(step: int) -> np.ndarray:
    """Learnable sequences (arithmetic progressions mod the vocabulary), two batches taking
    turns, so 20 steps visibly lower the loss."""
    rng = np.random.RandomState(100 + step % 2)
    start, stride = rng.randint(0, VOCAB, (4, 1)), rng.randint(1, 4, (4, 1))
    return ((start + stride * np.arange(16)) % VOCAB).astype(np.int32)


def jax_losses(model, params, loraplus_ratio=None) -> list[float]:
    base, adapters = lj.split(params)
    tx = lj.optimizer(optax.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS,
                                  weight_decay=WEIGHT_DECAY), adapters,
                      loraplus_ratio=loraplus_ratio)

    @jax.jit
    def step(adapters, opt_state, ids):
        def loss_fn(a):
            logits = lj.apply(model, {"params": lj.combine(base, a)}, ids)
            return models.cross_entropy(logits, ids, shift=True)
        loss, grads = jax.value_and_grad(loss_fn)(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    opt_state, losses = tx.init(adapters), []
    for i in range(STEPS):
        adapters, opt_state, loss = step(adapters, opt_state, jnp.asarray(batch(i)))
        losses.append(float(loss))
    return losses


def torch_losses(pm, loraplus_ratio=None) -> list[float]:
    trainable = [p for p in pm.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    if loraplus_ratio is None:
        opt = torch.optim.AdamW(trainable, lr=LR, betas=BETAS, eps=EPS,
                                weight_decay=WEIGHT_DECAY)
    else:  # PEFT's own LoRA+ optimizer: parameter groups, B at lr * ratio
        from peft.optimizers import create_loraplus_optimizer
        opt = create_loraplus_optimizer(pm, torch.optim.AdamW, lr=LR,
                                        loraplus_lr_ratio=loraplus_ratio, betas=BETAS, eps=EPS,
                                        loraplus_weight_decay=WEIGHT_DECAY)
    losses = []
    for i in range(STEPS):
        ids = torch.tensor(batch(i), dtype=torch.long)
        logits = pm(ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("family,scan,rslora", [("gpt2", False, False), ("llama", True, True)])
def test_adamw_losses_match_peft(checkpoints, tmp_path, family, scan, rslora):  # noqa: F811
    model, base = models.load_hf(checkpoints / family, scan_layers=scan)
    config = lora_config(family, rslora)
    # PEFT's default init (kaiming A) with a non-zero B, so both A and B get gradients at step 0.
    params = random_adapters(lj.inject(base, config, jax.random.key(1)), seed=2,
                             a_std=0.2, b_std=0.02)
    init = lj.export_peft(tmp_path / "init", params, config, **models.peft_naming(model))
    pm = peft.PeftModel.from_pretrained(torch_model(checkpoints / family), init,
                                        is_trainable=True).eval()
    ours, theirs = jax_losses(model, params), torch_losses(pm)
    rel = np.abs(np.array(ours) - np.array(theirs)) / np.abs(np.array(theirs))
    print(f"{family} scan={scan} rslora={rslora}: loss {theirs[0]:.4f} -> {theirs[-1]:.4f}, "
          f"max per-step relative difference {rel.max():.2e}")
    assert theirs[-1] < theirs[0] - 0.05  # it trains
    assert rel.max() < RTOL, rel


def test_loraplus_losses_match_peft(checkpoints, tmp_path):  # noqa: F811
    """`lj.optimizer(..., loraplus_ratio=4)` against PEFT's `create_loraplus_optimizer` (AdamW,
    B's group at 4x the rate, the same decoupled weight decay), 20 steps, 1e-5 per step; and
    the ratio matters: plain AdamW's losses differ from LoRA+'s by far more than that."""
    model, base = models.load_hf(checkpoints / "llama")
    config = lora_config("llama", False)
    params = random_adapters(lj.inject(base, config, jax.random.key(1)), seed=2,
                             a_std=0.2, b_std=0.02)
    init = lj.export_peft(tmp_path / "init", params, config, **models.peft_naming(model))
    pm = peft.PeftModel.from_pretrained(torch_model(checkpoints / "llama"), init,
                                        is_trainable=True).eval()
    ours, theirs = jax_losses(model, params, loraplus_ratio=4.0), torch_losses(pm, 4.0)
    rel = np.abs(np.array(ours) - np.array(theirs)) / np.abs(np.array(theirs))
    plain = np.array(jax_losses(model, params))
    print(f"LoRA+ ratio 4: loss {theirs[0]:.4f} -> {theirs[-1]:.4f}, max per-step relative "
          f"difference {rel.max():.2e}; plain AdamW ends at {plain[-1]:.4f}")
    assert rel.max() < RTOL, rel
    assert np.abs(plain - np.array(theirs)).max() / abs(theirs[-1]) > 100 * RTOL
