"""LoRA fine-tuning of GPT-2 and Llama-3 with lora_jax: one entry point for both families.

    python -m examples.train                                   # embedded GPT-2, sonnets, 1 device
    python -m examples.train --model llama3 --tp 2 --sp        # embedded Llama-3, 2 devices
    python -m examples.train --model-path /ckpt/Llama-3.2-1B --data chat.jsonl \\
        --dtype bfloat16 --scan-layers --remat dots_saveable --lr 2e-4 --steps 1000 \\
        --batch-size 16 --seq-len 2048 --dp 2 --tp 4 --sp \\
        --checkpoint-dir runs/x/ckpt --save-every 100 --resume \\
        --adapter-out runs/x/adapter --export-peft runs/x/peft --metrics-file runs/x/m.jsonl

`python -m examples.train --help` lists every flag. A bad flag or input ends with one line,
`error: ...`, on stderr and exit status 2.

The one long function below is the training loop, in banner sections: processes and mesh,
data, model, shard, step, loop, finish.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

import lora_jax as lj
import models
from examples import modeling
from examples.cli import Diverged, TrainConfig, run_cli
from examples.data import Batches, DataError, fixed_batches, read_documents, tokenize
from examples.metrics import MetricsLog, plot_loss
from examples.preflight import check_inputs, check_outputs
from examples.schedule import adapter_optimizer
from examples.steps import make_eval_step, make_loss, make_train_step
from sharding import CP, ContextParallelism, zigzag_order
from sharding import (BATCH_AXES, DistributedConfig, MeshError, TensorParallelism,
                      check_batch_fits, check_config_fits, init_sharded, initialize,
                      leaf_sharding, make_mesh, param_shardings, replicated)


INITIAL_ADAPTERS = "initial_adapters"  # a PiSSA / OLoRA run's adapters at init, in --checkpoint-dir


@dataclasses.dataclass
class Trained:
    """What `train` leaves behind, for callers such as the demo.

    model: the plain model (original config, no parallelism): for merge checks, export and
      generation. params: base and adapters, combined (sharded as trained).
    """

    model: Any
    params: Any
    lora_config: lj.LoraConfig
    tokenizer: Any
    records: list[dict]
    base_name: str
    mesh: Any
    outputs: dict[str, Path]


def train(cfg: TrainConfig) -> Trained:
    """Run one fine-tune as configured (see the module docstring and `examples/cli.py`).

    Args:
      cfg: the run's flags, from `examples.cli.parse_args`.

    Returns:
      `Trained`: the plain model, the trained params (base + adapters), the LoRA config, the
      tokenizer, the metrics records and the paths written.

    Raises:
      ValueError (LoraError, MeshError, DataError, CheckpointError) for bad flags or inputs,
      before any training step; `main` turns them into one line on stderr.

    Example:
      >>> out = train(parse_args(["--dp", "1", "--steps", "10", "--adapter-out", "runs/a"]))
      >>> out.records[-1]["loss"]
    """
    # ---- processes and mesh --------------------------------------------------------------
    check_inputs(cfg)
    check_outputs(cfg)  # every output writable and ours to replace, before any work
    if cfg.coordinator is not None:
        initialize(DistributedConfig(coordinator_address=cfg.coordinator,
                                     num_processes=cfg.num_processes, process_id=cfg.process_id))
    mesh = build_mesh(cfg)
    say = print if jax.process_index() == 0 else (lambda *a, **k: None)
    say(f"mesh: {dict(mesh.shape)} over {mesh.size} {jax.devices()[0].platform} device(s)"
        f"{', sequence parallel' if cfg.sp else ''}; {jax.process_count()} process(es)")

    # ---- data ----------------------------------------------------------------------------
    tokenizer = modeling.tokenizer_for(cfg)
    ids, weights = tokenize(read_documents(cfg.data), tokenizer.encode, eos_id(tokenizer))
    micro = cfg.batch_size // cfg.grad_accum
    check_batch_fits(mesh, batch=micro, seq=cfg.seq_len, sequence_parallel=cfg.sp)
    n_eval = int(len(ids) * cfg.eval_fraction) if cfg.eval_interval else 0
    batches = Batches(ids[:len(ids) - n_eval], weights[:len(ids) - n_eval], batch=cfg.batch_size,
                      seq_len=cfg.seq_len, seed=cfg.seed)
    eval_batches = held_out(ids[len(ids) - n_eval:], weights[len(ids) - n_eval:], cfg) \
        if cfg.eval_interval else None
    say(f"data: {cfg.data}: {len(ids):,} tokens ({n_eval:,} held out), {batches.per_epoch} "
        f"batches of {cfg.batch_size} x {cfg.seq_len} per epoch")

    # ---- model ---------------------------------------------------------------------------
    config, base_name = modeling.model_config(cfg)
    modeling.check_vocab(tokenizer, config)
    if cfg.seq_len > config.max_positions:
        raise ValueError(f"--seq-len {cfg.seq_len} exceeds the model's "
                         f"{config.max_positions} positions")
    check_config_fits(mesh, config)
    lora_cfg = lj.adapter_config(cfg.adapter_in) if cfg.adapter_in else modeling.lora_config(cfg)
    plain = models.build(config)
    # A quantised base at tp=1 is split by GSPMD (QuantDense); at tp>1 the shard_map layers
    # take it (sharding.quantized).
    parallel = (models.NoParallelism() if mesh.size == 1 or (cfg.quantize and cfg.tp == 1)
                else TensorParallelism(mesh=mesh, sequence_parallel=cfg.sp,
                                       collective_matmul=cfg.collective_matmul))
    order = None  # the zig-zag token order under --cp (None: natural)
    if cfg.cp > 1:  # the sequence split over cp, ring attention, GSPMD projections
        parallel = ContextParallelism(mesh=mesh, layout=cfg.cp_layout)
        if cfg.cp_layout == "zigzag":
            order = zigzag_order(cfg.seq_len, cfg.cp)
    model = models.build(modeling.training_config(config), parallel)
    init_base = lambda key: plain.init(key, jnp.zeros((1, 1), jnp.int32))["params"]  # noqa: E731
    key_base, key_lora, key_train = jax.random.split(jax.random.key(cfg.seed), 3)
    abstract = jax.eval_shape(init_base, key_base)
    if not cfg.adapter_in:  # a loaded adapter is checked against the model by load_adapter
        modeling.check_targets(lora_cfg.target_modules, modeling.module_paths(abstract))

    # ---- shard: base, adapters and optimizer state, each born on its devices ---------------
    base_sh = param_shardings(abstract, mesh)
    if cfg.model_path is None:
        base = jax.jit(init_base, out_shardings=base_sh)(key_base)
    else:
        _, base = models.load_hf(cfg.model_path, shardings=base_sh,
                                 **modeling.runtime_options(cfg))
    if cfg.adapter_in:  # placed by the adapter rule of sharding.rules, as it is read
        # Trained in the default place whatever name it was saved under (--adapter-name names
        # the outputs).
        adapters = lj.split(lj.load_adapter(cfg.adapter_in, base, adapter_name="default",
                                            shardings=leaf_sharding(mesh)))[1]
        say(f"adapter: loaded {cfg.adapter_in} (r={lora_cfg.r}, alpha={lora_cfg.lora_alpha}, "
            f"targets={lora_cfg.target_modules})")
    else:
        adapters = init_sharded(lambda p: lj.lora_params(lj.inject(p, lora_cfg, key_lora)),
                                base, mesh=mesh)
    initial = None  # PiSSA / OLoRA: the adapters at init, which the exports subtract
    if lj.inits.is_base_changing(lora_cfg.init_lora_weights) and not cfg.adapter_in:
        initial = initial_adapters(cfg, adapters, lora_cfg, base, base_name, mesh, say)
        base = jax.jit(lj.residual_base, out_shardings=base_sh)(base, initial)
        adapters = jax.jit(lambda t: jax.tree.map(jnp.copy, t),  # a copy: the step donates
                           out_shardings=param_shardings(initial, mesh))(initial)
    adapter_sh = param_shardings(adapters, mesh)
    say(lj.summary(lj.combine(base, adapters)))
    tx = adapter_optimizer(adapters, lr=cfg.learning_rate, schedule=cfg.schedule,
                           steps=cfg.steps, warmup=cfg.warmup_steps,
                           weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
                           loraplus_ratio=cfg.loraplus_ratio)
    opt_sh = param_shardings(jax.eval_shape(tx.init, adapters), mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(adapters)
    start, ckpt = 0, None
    if cfg.checkpoint_dir:
        ckpt = lj.TrainCheckpointer(cfg.checkpoint_dir, max_to_keep=cfg.keep, config=lora_cfg,
                                    settings=run_settings(cfg, lora_cfg, base_name, ids))
        found = resume_from(ckpt, cfg, adapters, opt_state)
        if found is not None:
            adapters, opt_state, start = found.adapters, found.opt_state, found.step
            batches.position, key_train = found.data_position["position"], found.rng
            say(f"resume: {found.describe()}")
        elif cfg.resume:
            say(f"resume: no checkpoint in {cfg.checkpoint_dir} yet; starting at step 1")
    last_saved = start if ckpt is not None and start else None

    # ---- step: one jitted program, explicit shardings, donated state ----------------------
    batch_sh = NamedSharding(mesh, P(None, BATCH_AXES, CP) if cfg.cp > 1 else
                             P(None, BATCH_AXES))
    loss_sums = make_loss(model, mesh=mesh, sequence_parallel=cfg.sp,
                          lora_dropout=lora_cfg.lora_dropout,
                          head_adapted=modeling.head_has_adapter(adapters))
    t0 = time.perf_counter()
    train_step = jax.jit(make_train_step(loss_sums, tx), donate_argnums=(0, 1),
                         in_shardings=(adapter_sh, opt_sh, base_sh, batch_sh, replicated(mesh)),
                         out_shardings=(adapter_sh, opt_sh, replicated(mesh)))
    place = functools.partial(place_batch, sharding=batch_sh, accum=cfg.grad_accum, order=order)
    example = place(batches.batch_at(batches.position))
    train_step = train_step.lower(adapters, opt_state, base, example, key_train).compile()
    eval_step = None
    if eval_batches is not None:
        eval_step = jax.jit(make_eval_step(loss_sums), out_shardings=replicated(mesh),
                            in_shardings=(adapter_sh, base_sh, batch_sh))
        eval_step = eval_step.lower(adapters, base, place(eval_batches[0], accum=1))
        eval_step = eval_step.compile()
    say(f"compiled in {time.perf_counter() - t0:.1f}s")
    flops = modeling.flops_per_token(config, abstract, cfg.seq_len)
    peak = cfg.peak_tflops * 1e12 * mesh.size

    # ---- loop ----------------------------------------------------------------------------
    log = MetricsLog(cfg.metrics_file if jax.process_index() == 0 else None)
    log.truncate_after(start)
    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
               disable=not cfg.progress or jax.process_index() != 0, file=sys.stderr,
               mininterval=0.1 if sys.stderr.isatty() else 10.0)  # logs get a line per 10s
    tokens_per_step = cfg.batch_size * cfg.seq_len
    pending, last = None, time.perf_counter()
    end = min(cfg.steps, start + cfg.stop_after) if cfg.stop_after else cfg.steps

    def flush(extra=None) -> tuple[dict, float]:
        """Log the pending step's record (waiting for it); stop the run if it diverged."""
        record, now = report(*pending, last, bar, tokens_per_step, flops, peak)
        record.update(extra(record) if extra else {})
        log.write(**record)
        stop_if_diverged(record, cfg, last_saved, bar)
        return record, now

    for step in range(start + 1, end + 1):
        batch = place(next(batches))
        adapters, opt_state, metrics = train_step(adapters, opt_state, base, batch,
                                                  jax.random.fold_in(key_train, step))
        if pending is not None:  # the previous step's numbers: reading them waits for it only
            _, last = flush()
        pending = (step, metrics)
        if cfg.eval_interval and (step % cfg.eval_interval == 0 or step == cfg.steps):
            record, _ = flush(lambda r: {"eval_loss": evaluate(eval_step, adapters, base,
                                                               eval_batches, place)})
            if jax.process_index() == 0:
                bar.write(f"step {step:5d}  loss {record['loss']:.4f}  "
                          f"eval_loss {record['eval_loss']:.4f}")
            pending, last = None, time.perf_counter()
        if ckpt is not None and (step == end or (cfg.save_every and
                                                       step % cfg.save_every == 0)):
            if pending is not None:  # a step is saved only once its loss is known finite
                _, last = flush()
                pending = None
            ckpt.save(step, adapters=adapters, opt_state=opt_state, rng=key_train,
                      data_position={"position": batches.position})
            last_saved = step
    if pending is not None:
        flush()
    bar.close()

    # ---- finish: checkpoints, adapter, exports, plot, sample -------------------------------
    if ckpt is not None:
        ckpt.close()
    params = lj.combine(base, adapters)
    outputs = save_outputs(cfg, params, lora_cfg, plain, base_name, initial)
    records = log.read()
    if cfg.plot_path and jax.process_index() == 0 and records and plot_loss(records,
                                                                            cfg.plot_path):
        outputs["plot"] = Path(cfg.plot_path).absolute()
    for name, path in outputs.items():
        say(f"{name}: {path}")
    if cfg.sample_prompt is not None and jax.process_count() == 1:
        say(f"sample: {cfg.sample_prompt!r} -> "
            f"{sample(plain, params, tokenizer, cfg.sample_prompt, cfg.sample_tokens)!r}")
    return Trained(model=plain, params=params, lora_config=lora_cfg, tokenizer=tokenizer,
                   records=records, base_name=base_name, mesh=mesh, outputs=outputs)


# ---------------------------------------------------------------------------------------------
# Helpers of the loop


def build_mesh(cfg: TrainConfig):
    """The (dp, fsdp, tp) mesh (with cp between fsdp and tp when --cp > 1): all devices when
    --dp is -1, else the first dp*fsdp*tp*cp."""
    if cfg.dp == -1:
        return make_mesh(dp=-1, fsdp=cfg.fsdp, tp=cfg.tp, cp=cfg.cp)
    wanted, available = cfg.dp * cfg.fsdp * cfg.tp * cfg.cp, jax.device_count()
    if wanted > available or (wanted < available and jax.process_count() > 1):
        raise MeshError(f"--dp {cfg.dp} x --fsdp {cfg.fsdp} x --tp {cfg.tp}"
                        f"{f' x --cp {cfg.cp}' if cfg.cp > 1 else ''} = {wanted} devices, "
                        f"but there are {available}" + (" (a multi-process run uses them all)"
                                                          if jax.process_count() > 1 else ""))
    return make_mesh(dp=cfg.dp, fsdp=cfg.fsdp, tp=cfg.tp, cp=cfg.cp,
                     devices=jax.devices()[:wanted])


def eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_id is None:
        raise ValueError("the tokenizer has no end-of-text token to separate documents")
    return int(tokenizer.eos_id)


def held_out(ids: np.ndarray, weights: np.ndarray, cfg: TrainConfig) -> list[dict]:
    """The held-out tail as evaluation batches of one training micro-batch each."""
    try:
        return fixed_batches(ids, weights, cfg.batch_size // cfg.grad_accum, cfg.seq_len)
    except DataError as err:
        raise DataError(f"{err} (--eval-fraction {cfg.eval_fraction}): raise --eval-fraction, "
                        "lower --seq-len, or pass --eval-interval 0") from None


def place_batch(batch: dict, *, sharding: NamedSharding, accum: int,
                order: np.ndarray | None = None) -> dict:
    """Host `[B, T]` arrays -> global `[accum, B / accum, T]` arrays split over dp x fsdp; every
    process holds the whole batch (the loader is deterministic) and gives each device its rows.
    With `order` (context parallelism's zig-zag), every array's tokens are reordered alike and
    "positions" (the natural ones, for RoPE and the causal mask) are added."""
    if order is not None:
        batch = {**{k: v[:, order] for k, v in batch.items()},
                 "positions": np.broadcast_to(order.astype(np.int32), batch["inputs"].shape)}
    def one(x):
        x = np.ascontiguousarray(x.reshape(accum, x.shape[0] // accum, *x.shape[1:]))
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
    return jax.tree.map(one, batch)


def initial_adapters(cfg: TrainConfig, adapters, lora_cfg: lj.LoraConfig, base, base_name: str,
                     mesh, say):
    """A PiSSA / OLoRA run's adapters at init (`adapters`, from inject on the original base).
    With --checkpoint-dir they are saved once in `<dir>/initial_adapters` and a resumed run reads
    them back from there, so its residual base and its exports subtract exactly the same
    adapters; an existing copy is never overwritten."""
    if not cfg.checkpoint_dir:
        return adapters
    path = Path(cfg.checkpoint_dir) / INITIAL_ADAPTERS
    if path.exists():
        if not cfg.resume:
            raise ValueError(f"{path} holds the initial adapters of an earlier run: pass --resume "
                             "to continue it, or use an empty --checkpoint-dir")
        say(f"init: {lora_cfg.init_lora_weights}: initial adapters read from {path}")
        return lj.lora_params(lj.load_adapter(path, base, shardings=leaf_sharding(mesh)))
    lj.save_adapter(path, adapters, lora_cfg, base_model=base_name)
    say(f"init: {lora_cfg.init_lora_weights}: the base is now the residual; initial adapters "
        f"saved in {path}")
    return adapters


def run_settings(cfg: TrainConfig, lora_cfg: lj.LoraConfig, base_name: str,
                 ids: np.ndarray) -> dict:
    """What a resume must share with the run that wrote the checkpoints, keyed by flag: the
    adapters' shapes and meaning, the model, and the data stream (path, and a hash of its
    token ids: the data as read and tokenised, without reading the file again)."""
    return {"--rank": lora_cfg.r, "--alpha": lora_cfg.lora_alpha,
            "--targets": lora_cfg.to_dict()["target_modules"], "--rslora": lora_cfg.use_rslora,
            "--dropout": lora_cfg.lora_dropout, "--model": base_name,
            **({"--init": cfg.init} if cfg.init != "default" else {}),
            "--scan-layers": cfg.scan_layers, "--batch-size": cfg.batch_size,
            "--seq-len": cfg.seq_len, "--grad-accum": cfg.grad_accum, "--seed": cfg.seed,
            "--data": str(Path(cfg.data).absolute()), "data tokens": token_digest(ids),
            "--eval-fraction": cfg.eval_fraction,
            # only when set, so settings written before the flag existed still compare equal
            **({"--modules-to-save": list(lora_cfg.modules_to_save)}
               if lora_cfg.modules_to_save else {}),
            **({"--dora": True} if lora_cfg.use_dora else {})}


def token_digest(ids: np.ndarray) -> str:
    """A short SHA-256 of the token stream a run trains and evaluates on."""
    return hashlib.sha256(np.ascontiguousarray(ids, np.int32).tobytes()).hexdigest()[:16]


def stop_if_diverged(record: dict, cfg: TrainConfig, last_saved: int | None, bar) -> None:
    """Raise `Diverged` if the step's loss or gradient norm is NaN/inf. The train step made no
    update from that gradient, and no checkpoint of it is written."""
    if math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"]):
        return
    bar.close()
    kept = (f"the last checkpoint, step {last_saved} in {cfg.checkpoint_dir}, is intact"
            if last_saved else "no checkpoint was written")
    raise Diverged(f"step {record['step']}: loss {record['loss']}, gradient norm "
                   f"{record['grad_norm']}: the run diverged and was stopped; {kept} and no "
                   f"adapter was exported. Lower --lr (now {cfg.learning_rate:g}) or set "
                   "--grad-clip.")


def resume_from(ckpt: lj.TrainCheckpointer, cfg: TrainConfig, adapters, opt_state):
    """The checkpoint to continue from (None: fresh start); refuses to mix runs."""
    if not cfg.resume:
        if ckpt.latest_step() is not None:
            raise ValueError(f"--checkpoint-dir {cfg.checkpoint_dir} already holds step "
                             f"{ckpt.latest_step()}: pass --resume to continue it, or use an "
                             "empty directory")
        return None
    found = ckpt.restore(adapters=adapters, opt_state=opt_state)
    if found is not None and found.step > cfg.steps:
        raise ValueError(f"the checkpoint is at step {found.step}, past --steps {cfg.steps}")
    return found


def report(step: int, metrics: dict, last: float, bar, tokens: int, flops: float,
           peak: float) -> tuple[dict, float]:
    """One step's metrics record (waiting for them) and the bar updated; and the time now."""
    values = {k: float(v) for k, v in metrics.items()}
    now = time.perf_counter()
    tps = tokens / max(now - last, 1e-9)
    record = dict(step=step, loss=values["loss"], grad_norm=values["grad_norm"],
                  tokens=int(values["tokens"]), tokens_per_s=tps, mfu=tps * flops / peak)
    bar.set_postfix_str(f"loss {record['loss']:.4f} | {tps:,.0f} tok/s | "
                        f"MFU {100 * record['mfu']:.3g}%", refresh=False)
    bar.update(1)
    return record, now


def evaluate(eval_step, adapters, base, eval_batches: list[dict], place) -> float:
    """Mean token NLL over every held-out row."""
    nll = count = 0.0
    for batch in eval_batches:
        s, n = eval_step(adapters, base, place(batch, accum=1))
        nll, count = nll + float(s), count + float(n)
    return nll / max(count, 1.0)


def save_outputs(cfg: TrainConfig, params, lora_cfg: lj.LoraConfig, plain,
                 base_name: str, initial=None) -> dict[str, Path]:
    """The adapter (orbax), the PEFT adapter and the merged model, as the flags ask. After a
    PiSSA / OLoRA init (`initial`: the adapters at init) both adapters are written as plain LoRA
    of rank 2r for the ORIGINAL base, as PEFT converts them; the merged model is the trained one
    (residual base + adapters) either way."""
    out = {}
    plain_params, plain_cfg = lj.inits.for_export(params, lora_cfg, initial)
    if cfg.adapter_name != "default":  # the one trained adapter, under its name
        plain_params = lj.rename_adapter(plain_params, "default", cfg.adapter_name)
    if cfg.adapter_out:
        out["adapter"] = lj.save_adapter(cfg.adapter_out, plain_params, plain_cfg,
                                         base_model=base_name, overwrite=cfg.overwrite)
    if cfg.export_peft:  # "default" in the directory itself, another name in <dir>/<name>
        out["peft"] = lj.export_peft_adapters(cfg.export_peft, plain_params,
                                              {cfg.adapter_name: plain_cfg},
                                              base_model_name_or_path=base_name,
                                              overwrite=cfg.overwrite,
                                              **models.peft_naming(plain))
    if cfg.export_merged:
        out["merged"] = lj.export_merged(cfg.export_merged, params,
                                         hf_writer_with_tokenizer(plain, cfg.model_path),
                                         overwrite=cfg.overwrite, dtype=cfg.export_dtype)
    return out


def hf_writer_with_tokenizer(plain, model_path: str | None):
    """`models.hf_writer(plain)`, then the base directory's tokenizer files copied beside the
    weights, so the merged `hf/` serves (transformers, vLLM) on its own."""
    write = models.hf_writer(plain)

    def write_with_tokenizer(directory: Path, params, dtype):
        files = write(directory, params, dtype)
        for name in models.TOKENIZER_FILES if model_path else ():
            source = Path(model_path) / name
            if source.is_file():
                files.append(Path(shutil.copy2(source, Path(directory) / name)))
        return files

    return write_with_tokenizer


def sample(model, params, tokenizer, prompt: str, tokens: int, **kwargs) -> str:
    """A continuation with the adapters applied (not merged): greedy, unless `kwargs` ask
    `models.generate` for sampling (temperature=, top_p=, rng=)."""
    return models.generate_text(model, params, tokenizer, prompt, max_new_tokens=tokens,
                                apply_fn=functools.partial(lj.apply, model), **kwargs)


def main(argv=None) -> int:
    """The CLI: flags in, exit status out (0, or 2 after `error: ...` on stderr)."""
    return run_cli(train, argv)


if __name__ == "__main__":
    sys.exit(main())
