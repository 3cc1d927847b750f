"""The fused dequantise-in-the-GEMM kernels (`models.quant_pallas`) and `quant_impl="pallas"`.

The kernels run in Pallas interpret mode on CPU; their Triton lowering is checked by exporting
them for CUDA (the Pallas -> Triton lowering runs without a GPU).

Tolerances: the kernels multiply exactly the values the XLA path does (`dequantize`: code value
times the float32 scale, cast to the compute dtype) and accumulate in float32; only the
summation order differs (64-row steps, even and odd rows in two dots). In float32 that moves
the result by a few ulps of its largest terms: 2e-6 relative (in norm) over K <= 256 leaves
room for the order and still fails on any wrong nibble, row parity or scale (errors >= 1e-2).
"""
import contextlib
import functools
import re
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import quant_pallas as qp
from models.llama import Llama, LlamaConfig
from models.options import RuntimeOptions
from models.quant import quantize as _eager_quantize, quantized_matmul

M, K, N = 48, 256, 128  # M is no tile multiple: the kernels pad it and slice it back
TOL = 2e-6
quantize = jax.jit(_eager_quantize, static_argnums=1, static_argnames="dtype")  # eager is slow


def gaussian(shape, seed, std=1.0):
    return jnp.asarray(std * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def rel(a, b):
    return float(jnp.linalg.norm(jnp.asarray(a, jnp.float32) - b) / jnp.linalg.norm(b))


@pytest.fixture(scope="module")
def kernels():
    w = gaussian((K, N), seed=1, std=0.02)
    return {fmt: quantize(w, fmt, dtype=jnp.float32) for fmt in ("nf4", "int8")}


# Default tiles (one program) and small ones (several programs over M, N and K groups, and
# several steps of every loop), so block indexing is exercised, not only the loops.
# The variants of issue 15 ride along: several NF4 blocks per K step (bk=256: 4, one step;
# bk=128: 2, two steps; each byte row must pick its own block's scale), grouped launch order
# (group=2 over 3 row blocks: a short last group), the table decode, scales on the
# accumulator, the swapped product (transposed accumulators), x in split even/odd order.
TILES = [dict(), dict(bm=16, bn=32, bk=256, group=2, split_x=True),
         dict(bm=16, bn=32, bk=128, decode="lut", scale_acc=True, swap_ab=True)]
TILES_T = [dict(), dict(bm=16, bk=128, bn=32, group=2),
           dict(bm=16, bk=64, bn=32, decode="lut", swap_ab=True)]


@pytest.mark.parametrize("tiles,tiles_t", list(zip(TILES, TILES_T)))
def test_nf4_kernels_equal_the_dequantised_product(kernels, tiles, tiles_t):
    q = kernels["nf4"]
    w = q.dequantize(jnp.float32)
    x, dy = gaussian((M, K), seed=2), gaussian((M, N), seed=3)
    y = qp.nf4_matmul(x, q.codes, q.block_scales(), jnp.float32, **tiles)
    dx = qp.nf4_matmul_t(dy, q.codes, q.block_scales(), jnp.float32, **tiles_t)
    assert y.shape == (M, N) and dx.shape == (M, K)
    assert rel(y, x @ w) < TOL
    assert rel(dx, dy @ w.T) < TOL


@pytest.mark.parametrize("tiles,tiles_t", [(dict(), dict()),
                                           (dict(bm=16, bn=32, bk=32, group=2, swap_ab=True),
                                            dict(bm=16, bk=64, bn=32, group=2, swap_ab=True))])
def test_int8_kernels_equal_the_codes_product(kernels, tiles, tiles_t):
    codes, scale = kernels["int8"].codes, kernels["int8"].scale
    c = codes.astype(jnp.float32)
    x, dy = gaussian((M, K), seed=4), gaussian((M, N), seed=5)
    assert rel(qp.int8_matmul(x, codes, jnp.float32, **tiles), x @ c) < TOL
    assert rel(qp.int8_matmul(x, codes, jnp.float32, scale, **tiles), (x @ c) * scale) < TOL
    assert rel(qp.int8_matmul_t(dy, codes, jnp.float32, **tiles_t), dy @ c.T) < TOL


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_pallas_impl_forward_and_gradient_equal_xla(kernels, fmt):
    """`quantized_matmul(..., impl="pallas")` on [..., K] activations: the kernels run (a
    pallas_call in the jaxpr), and value and input gradient equal the XLA path's."""
    q = kernels[fmt]
    x = gaussian((2, M // 2, K), seed=6)
    f = {impl: functools.partial(quantized_matmul, q=q, dtype=jnp.float32, impl=impl)
         for impl in ("xla", "pallas")}
    loss = {impl: jax.jit(jax.value_and_grad(lambda x, f=f[impl]: jnp.sum(jnp.sin(f(x)))))
            for impl in f}
    assert "pallas_call" in str(jax.make_jaxpr(loss["pallas"])(x))
    (v_p, g_p), (v_x, g_x) = loss["pallas"](x), loss["xla"](x)
    assert rel(f["pallas"](x), f["xla"](x)) < TOL
    assert abs(float(v_p - v_x)) <= 1e-4 * abs(float(v_x)) + 1e-4
    assert rel(g_p, g_x) < TOL


@pytest.mark.parametrize("rows,cols,group", [(3, 5, 2), (4, 3, 4), (5, 2, 8), (2, 7, 1)])
def test_grouped_launch_order_visits_every_tile_once(rows, cols, group):
    """`_grid`'s grouped order is a permutation of the [rows, cols] tiles, row fastest within
    a group of `group` row blocks (the last group short when rows % group != 0)."""
    grid, tile = qp._grid(rows, cols, group)
    order = [tuple(int(v) for v in tile(jnp.int32(p))) for p in range(grid[0])]
    assert grid == (rows * cols,) and sorted(order) == [(i, j) for i in range(rows)
                                                          for j in range(cols)]
    g = min(group, rows)
    assert order[:min(g, rows)] == [(i, 0) for i in range(g)]


def test_split_even_odd_order():
    x = jnp.arange(16.0).reshape(2, 8)
    np.testing.assert_array_equal(qp.split_even_odd(x, 4)[1], [8, 10, 9, 11, 12, 14, 13, 15])
    with pytest.raises(ValueError, match="group=3"):
        qp.split_even_odd(x, 3)


def test_bad_decode_and_group_are_refused(kernels):
    q = kernels["nf4"]
    x = jnp.ones((16, K))
    with pytest.raises(ValueError, match="decode='gather'.*lut"):
        qp.nf4_matmul(x, q.codes, q.block_scales(), decode="gather")
    with pytest.raises(ValueError, match="group=0"):
        qp.nf4_matmul_t(jnp.ones((16, N)), q.codes, q.block_scales(), group=0)


def _kernel_shaped_float_buffers(hlo: str) -> list[str]:
    """Float buffers shaped like the [K, N] kernel (or its transpose) in HLO text."""
    return [s for dt in ("f32", "bf16", "f16") for shape in ((K, N), (N, K))
            if (s := f"{dt}[{shape[0]},{shape[1]}]") in hlo]


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_no_dequantised_kernel_in_the_compiled_hlo(kernels, fmt):
    """Forward + backward under impl="pallas" compile to HLO with no float [K, N] buffer; the
    same check finds one under impl="xla" (it dequantises the whole kernel), so it can fail."""
    q = kernels[fmt]
    x = jax.ShapeDtypeStruct((M, K), jnp.float32)

    def hlo(impl):
        # The kernel is an argument (a closed-over one would be constant-folded away) and the
        # loss is not linear (else dx = ones @ W^T would not depend on x and fold too).
        loss = lambda x, q: jnp.sum(jnp.sin(quantized_matmul(x, q, jnp.float32, impl=impl)))
        return jax.jit(jax.grad(loss)).lower(x, q).compile().as_text()

    assert _kernel_shaped_float_buffers(hlo("pallas")) == []
    # The control holds where the suite runs, on the CPU. On a GPU, XLA's Triton GEMM fusion
    # may take the dequantisation in as a prologue at these small shapes (seen on the H200 with
    # jax 0.11.2), so there even "xla" writes no kernel-shaped buffer.
    if jax.default_backend() == "cpu":
        assert _kernel_shaped_float_buffers(hlo("xla")) != []


def test_shapes_that_do_not_tile_take_the_xla_path():
    """N=40 has no power-of-two divisor >= 16: `fits` is False and impl="pallas" runs the XLA
    rules (no pallas_call), with the same result; the kernels themselves refuse it clearly."""
    q = quantize(gaussian((128, 40), seed=7, std=0.02), "nf4", dtype=jnp.float32)
    x = gaussian((3, 128), seed=8)
    assert not qp.fits(q)
    f = lambda x: quantized_matmul(x, q, jnp.float32, impl="pallas")
    assert "pallas_call" not in str(jax.make_jaxpr(f)(x))
    np.testing.assert_array_equal(f(x), quantized_matmul(x, q, jnp.float32))
    with pytest.raises(ValueError, match="XLA path"):
        qp.nf4_matmul(x, q.codes, q.block_scales())
    fp8 = quantize(gaussian((128, 64), seed=9, std=0.02), "fp8", dtype=jnp.float32)
    assert not qp.fits(fp8)  # FP8 already multiplies in FP8


def test_bad_impl_is_refused():
    q = quantize(gaussian((64, 32), seed=10, std=0.02), "int8")
    with pytest.raises(ValueError, match="quant_impl='triton'"):
        quantized_matmul(jnp.ones((2, 64)), q, impl="triton")
    with pytest.raises(ValueError, match="quant_impl"):
        RuntimeOptions(quant_impl="triton")
    from examples.cli import parse_args
    with pytest.raises(ValueError, match="--quantize"):
        parse_args(["--quant-impl", "pallas"])
    assert parse_args(["--quantize", "nf4", "--quant-impl", "pallas"]).quant_impl == "pallas"


def _require_triton() -> None:
    try:
        from jax._src.lib import triton
        ok = getattr(triton, "dialect", None) is not None
    except ImportError:
        ok = False
    if not ok:
        pytest.skip("this jaxlib has no Triton bindings, so Pallas cannot lower to Triton here")


def _lowering_for_a_hopper_gpu():
    """What GPU the Triton lowering targets when none is present. jax <= 0.10 falls back to
    compute capability 9.0 by itself; jax 0.11 reads it from the current abstract mesh's device
    or the default device, a CPU here either way (inside the tp tests' shard_map too, whose mesh
    is of CPU devices), and refuses. So its GPU lookup is pointed at an H200 (9.0, the lent GPU)."""
    try:
        from jax._src.pallas.triton import gpu_info
    except ImportError:  # jax <= 0.10
        return contextlib.nullcontext()
    h200 = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H200)
    return mock.patch.object(gpu_info, "get_gpu_info", lambda: h200)


def _export_for_cuda(fn, *args) -> str:
    with _lowering_for_a_hopper_gpu():
        exported = jax.export.export(
            jax.jit(fn), platforms=("cuda",),
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
            *args)
    return exported.mlir_module()


def test_kernels_lower_to_triton_for_cuda():
    """Cross-platform export runs the Pallas -> Triton lowering on this CPU machine (block
    shapes, strided loads/stores, dots, table and select-tree decodes, grouped grids), in bf16
    as on the GPU, with a K that is no power of two (192 = 3 NF4 blocks) and N=96 (tiles of
    32)."""
    _require_triton()
    m, k, n = 48, 192, 96
    S, bf16 = jax.ShapeDtypeStruct, jnp.bfloat16
    codes4, scales = S((k // 2, n), jnp.uint8), S((k // 64, n), jnp.float32)
    codes8 = S((k, n), jnp.int8)
    cases = [(qp.nf4_matmul, (S((m, k), bf16), codes4, scales)),
             (qp.nf4_matmul_t, (S((m, n), bf16), codes4, scales)),
             (qp.int8_matmul, (S((m, k), bf16), codes8)),
             (qp.int8_matmul_t, (S((m, n), bf16), codes8))]
    # Issue 15's variants: the select tree (default), grouped order, the table decode, scales on the
    # accumulator; several NF4 blocks per step below.
    variants = {qp.nf4_matmul: [dict(), dict(group=2), dict(decode="lut"),
                                dict(scale_acc=True, group=4), dict(swap_ab=True),
                                dict(swap_ab=True, scale_acc=True, split_x=True)],
                qp.nf4_matmul_t: [dict(), dict(group=2), dict(decode="lut"),
                                  dict(swap_ab=True)],
                qp.int8_matmul: [dict(), dict(group=8, swap_ab=True)],
                qp.int8_matmul_t: [dict(), dict(group=8, swap_ab=True)]}
    for fn, args in cases:
        for kw in variants[fn]:
            text = _export_for_cuda(
                functools.partial(fn, out_dtype=jnp.float32, interpret=False, **kw), *args)
            assert "__gpu$xla.gpu.triton" in text, (fn.__name__, kw)
            assert "mosaic" not in text.lower(), (fn.__name__, kw)
    # Several NF4 blocks per K step need K / 64 even: K = 256 (bk=192 rounds down to 2 blocks).
    k = 256
    codes4, scales = S((k // 2, n), jnp.uint8), S((k // 64, n), jnp.float32)
    for fn, x, kw in [(qp.nf4_matmul, S((m, k), bf16), dict(bk=256, group=2, swap_ab=True,
                                                             split_x=True)),
                      (qp.nf4_matmul, S((m, k), bf16), dict(bk=192, scale_acc=True)),
                      (qp.nf4_matmul_t, S((m, n), bf16), dict(bk=256, group=2))]:
        text = _export_for_cuda(
            functools.partial(fn, out_dtype=jnp.float32, interpret=False, **kw), x, codes4, scales)
        assert "__gpu$xla.gpu.triton" in text, (fn.__name__, kw)


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_cuda_training_step_has_two_triton_calls_and_no_float_kernel(fmt, monkeypatch):
    """value_and_grad of a bf16 pallas-impl projection exported for CUDA, as the GPU would
    compile it (interpret mode off): one Triton call forward, one backward, and no float
    tensor shaped like the [K, N] kernel in the StableHLO; impl="xla" has one (the check can
    fail)."""
    _require_triton()
    monkeypatch.setattr(qp, "_interpret", lambda interpret: False)
    k, n = 192, 96
    q = jax.eval_shape(lambda: quantize(jnp.zeros((k, n)), fmt, dtype=jnp.bfloat16))
    x = jax.ShapeDtypeStruct((2, 24, k), jnp.bfloat16)
    kernel_shaped = re.compile(rf"tensor<(?:{k}x{n}|{n}x{k})x(?:f32|bf16|f16)>")

    def exported(impl):
        loss = lambda x, q: jnp.sum(jnp.sin(
            quantized_matmul(x, q, jnp.bfloat16, impl=impl).astype(jnp.float32)))
        return _export_for_cuda(jax.value_and_grad(loss), x, q)

    text = exported("pallas")
    assert text.count("@__gpu$xla.gpu.triton(") == 2
    assert not kernel_shaped.search(text)
    assert kernel_shaped.search(exported("xla"))


def test_tiny_llama_logits_equal_across_impls(fmt="nf4"):
    """A tiny NF4 Llama gives the same logits with quant_impl="pallas" as with "xla" (same
    params: the option changes how kernels multiply, not what is stored). int8 goes through
    the same QuantDense -> quantized_matmul wiring, tested above."""
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 500, (2, 8)), jnp.int32)
    models = {impl: Llama(LlamaConfig.tiny(quantize=fmt, quant_impl=impl, num_hidden_layers=1))
              for impl in ("xla", "pallas")}
    params = jax.jit(models["xla"].init)(jax.random.key(0), ids)  # eager quantising is slow
    logits = {impl: jax.jit(m.apply)(params, ids) for impl, m in models.items()}
    assert "pallas_call" in str(jax.make_jaxpr(models["pallas"].apply)(params, ids))
    assert rel(logits["pallas"], logits["xla"]) < 1e-5  # 1 layer of float32, other sum order


def test_quant_gemm_benchmark_smoke():
    """`benchmarks.quant_gemm --smoke --sweep` times every (format, impl, direction) on a tiny
    shape and checks pallas (default and sweep candidates) against xla (float32 here)."""
    from benchmarks import quant_gemm
    rows = quant_gemm.main(["--smoke", "--sweep"])
    timed = {(r["format"], r["impl"], r["direction"]) for r in rows if "ms" in r}
    want = {(f, i, d) for f in ("nf4", "int8") for i in ("xla", "pallas", "pallas-sweep")
            for d in ("forward", "backward")} | {("bf16", "dense", "forward"),
                                                 ("bf16", "dense", "backward")}
    assert timed == want and not [r for r in rows if "error" in r]
    for impl in ("pallas", "pallas-sweep"):  # the sweep's candidates are checked too
        checks = [r["max_rel_vs_xla"] for r in rows if r["impl"] == impl]
        assert len(checks) == 4 and max(checks) < 1e-5  # max-norm relative: looser than TOL
