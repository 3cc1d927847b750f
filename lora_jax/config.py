"""`LoraConfig`: the adapter hyper-parameters, with HF PEFT's field names and meanings."""
from __future__ import annotations

import dataclasses
import math
import numbers
import re
from typing import Mapping, Sequence

import jax.numpy as jnp

from lora_jax.errors import LoraError

ALL_LINEAR = "all-linear"
INIT_SCHEMES = (True, False, "gaussian", "pissa", "olora")
# "pissa_niter_K" (K >= 0 subspace iterations of a randomized SVD) is accepted as well.
_PISSA_NITER = re.compile(r"pissa_niter_\d+")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """LoRA hyper-parameters, named and interpreted as in HF PEFT's `LoraConfig`.

    Args:
      r: default rank of every adapter.
      lora_alpha: default alpha; an adapter's scale is `alpha / r` (`alpha / sqrt(r)` with rsLoRA).
      lora_dropout: dropout on the adapter's input, active only when not deterministic.
      target_modules: a list of module-name suffixes matched on dotted paths (`"q_proj"` matches
        `model.layers.0.self_attn.q_proj`), a regex string matched with `re.fullmatch` against the
        whole dotted path, or `"all-linear"` (every Dense kernel but the output head `lm_head`).
      exclude_modules: same forms as `target_modules`; matches are removed from the targets.
      use_rslora: rank-stabilised scale `alpha / sqrt(r)`.
      rank_pattern / alpha_pattern: `{regex: value}` overrides per module; a key matches a
        module whose dotted path ends with it (PEFT's rule: `(.*\\.)?key` fullmatch).
      init_lora_weights: `True` (PEFT's kaiming-uniform A, zero B), `"gaussian"` (A ~ N(0, 1/r),
        zero B), `False` (random B too: for tests only, the model output changes at init), or
        the inits that also rewrite the kernels (`lora_jax.inits`): `"pissa"` (exact SVD),
        `"pissa_niter_K"` (randomized SVD, K subspace iterations) and `"olora"` (QR).
      adapter_dtype: dtype of the `lora_a`/`lora_b` leaves (float32 as PEFT keeps them).
      output_head_names: module names that `"all-linear"` skips.
      modules_to_save: module names (suffixes, as `target_modules`) of modules trained in full:
        each gets a trainable copy of its leaves (`saved_kernel`, `saved_embedding`, ...) that
        the model runs instead of the frozen original, as PEFT's `modules_to_save`.
      ensure_weight_tying: PEFT's flag: with an embedding adapter, the tied output head
        (`nn.Embed.attend`) runs the adapted table too (the transposed delta). Off, as in PEFT,
        a tied head stays on the base table.
      use_dora: DoRA (weight-decomposed LoRA, PEFT's `use_dora`): a trained `lora_magnitude`
        leaf per output feature rescales each adapted column (`lora_jax.dora`).

    Example:
      >>> cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
      >>> cfg.scale_for("model.layers.0.self_attn.q_proj")
      2.0
    """

    r: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    target_modules: str | Sequence[str] | None = None
    exclude_modules: str | Sequence[str] | None = None
    use_rslora: bool = False
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    init_lora_weights: bool | str = True
    adapter_dtype: str = "float32"
    output_head_names: Sequence[str] = ("lm_head",)
    modules_to_save: Sequence[str] | None = None
    ensure_weight_tying: bool = False
    use_dora: bool = False

    def __post_init__(self):
        for name in ("target_modules", "exclude_modules", "output_head_names", "modules_to_save"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                object.__setattr__(self, name, tuple(value))
        if isinstance(self.modules_to_save, str):  # one name, as PEFT's CLI-style configs give
            object.__setattr__(self, "modules_to_save", (self.modules_to_save,))
        # numpy scalars (np.int64(8), np.float32(16)) are accepted and stored as Python numbers,
        # so the config stays JSON-able and hashable.
        object.__setattr__(self, "r", _rank("r", self.r))
        object.__setattr__(self, "rank_pattern", {k: _rank(f"rank_pattern[{k!r}]", v)
                                                  for k, v in dict(self.rank_pattern).items()})
        object.__setattr__(self, "lora_alpha", _real("lora_alpha", self.lora_alpha))
        object.__setattr__(self, "alpha_pattern", {k: _real(f"alpha_pattern[{k!r}]", v)
                                                   for k, v in dict(self.alpha_pattern).items()})
        object.__setattr__(self, "lora_dropout", _real("lora_dropout", self.lora_dropout))
        self._validate()

    def _validate(self):
        if self.target_modules is None or (not isinstance(self.target_modules, str)
                                           and len(self.target_modules) == 0):
            raise LoraError("LoraConfig.target_modules is empty: pass module-name suffixes such as "
                            "['q_proj', 'v_proj'], a regex, or 'all-linear'.")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, str) and value != ALL_LINEAR:
                _compile(f"LoraConfig.{name}", value)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise LoraError(f"LoraConfig.lora_dropout = {self.lora_dropout}: use a probability "
                            "in [0, 1).")
        _check_adapter_dtype(self.adapter_dtype)
        _check_init(self.init_lora_weights)
        for key in (*self.rank_pattern, *self.alpha_pattern):
            _compile("a rank/alpha_pattern key", key)
        if not isinstance(self.use_dora, bool):
            raise LoraError(f"LoraConfig.use_dora = {self.use_dora!r}: pass True or False.")

    def rank_for(self, path: str) -> int:
        """The rank of the adapter at dotted module `path` (rank_pattern, else `r`)."""
        key = pattern_key(self.rank_pattern, path)
        return self.r if key is None else self.rank_pattern[key]

    def checked_rank(self, path: str, fan_in: int, fan_out: int, what: str = "kernel") -> int:
        """`rank_for(path)`, refused (naming the fix) when it exceeds the smaller of the adapted
        matrix's two dimensions (a kernel's in/out, an embedding table's rows/features)."""
        rank = self.rank_for(path)
        if rank > min(fan_in, fan_out):
            raise LoraError(f"rank {rank} for {path!r} exceeds the {what}'s smaller dimension "
                            f"({fan_in} x {fan_out}); choose r <= {min(fan_in, fan_out)} "
                            "(rank_pattern can lower it for this module).")
        return rank

    def alpha_for(self, path: str) -> float:
        """The alpha of the adapter at dotted module `path` (alpha_pattern, else `lora_alpha`)."""
        key = pattern_key(self.alpha_pattern, path)
        return self.lora_alpha if key is None else self.alpha_pattern[key]

    def scale_for(self, path: str) -> float:
        """`alpha / r`, or `alpha / sqrt(r)` with rsLoRA, for the adapter at `path`."""
        rank = self.rank_for(path)
        denominator = math.sqrt(rank) if self.use_rslora else rank
        return float(self.alpha_for(path)) / denominator

    def to_dict(self) -> dict:
        """A JSON-able dict (lists for tuples) that `from_dict` turns back into this config."""
        out = dataclasses.asdict(self)
        for name in ("target_modules", "exclude_modules", "output_head_names", "modules_to_save"):
            if isinstance(out[name], tuple):
                out[name] = list(out[name])
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> "LoraConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _rank(where: str, value: object) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
        raise LoraError(f"LoraConfig.{where} = {value!r}: a LoRA rank must be a positive "
                        "integer, e.g. r=8.")
    return int(value)


def _real(where: str, value: object) -> float:
    """A finite real number (int or float, numpy scalars too), as a Python number."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise LoraError(f"LoraConfig.{where} = {value!r} ({type(value).__name__}): pass a "
                        "number, e.g. 16.")
    if not math.isfinite(value):
        raise LoraError(f"LoraConfig.{where} = {value!r}: it must be a finite number.")
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _compile(where: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise LoraError(f"{where} {pattern!r} is not a valid regular expression ({err}); "
                        "pass module-name suffixes as a list, or fix the regex.") from err


def _check_init(init: object) -> None:
    """True / False (bools only: 1 and 0 are not inits), or one of PEFT's names we implement."""
    ok = init is True or init is False or (isinstance(init, str) and (
        init in INIT_SCHEMES or _PISSA_NITER.fullmatch(init) is not None))
    if not ok:
        raise LoraError(f"LoraConfig.init_lora_weights = {init!r} is not supported: use True "
                        "(kaiming-uniform A, zero B), 'gaussian', 'pissa', 'pissa_niter_K' (K an "
                        "integer >= 0, e.g. 'pissa_niter_4'), 'olora', or False (tests only).")


def _check_adapter_dtype(name: str) -> None:
    try:
        dtype = jnp.dtype(name)
    except TypeError as err:
        raise LoraError(f"LoraConfig.adapter_dtype = {name!r} is not a dtype; use 'float32' or "
                        "'bfloat16'.") from err
    if not jnp.issubdtype(dtype, jnp.floating):
        raise LoraError(f"LoraConfig.adapter_dtype = {name!r}: adapters are trained, so they need "
                        "a floating-point dtype ('float32', 'bfloat16').")


def pattern_key(pattern: Mapping[str, object], path: str) -> str | None:
    """The first key of a rank/alpha pattern that matches `path`, PEFT's way: the path ends with
    the key as a whole dotted component sequence (regex allowed)."""
    for key in pattern:
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", path):
            return key
    return None


def matches_modules(spec: str | Sequence[str] | None, path: str) -> bool:
    """PEFT's target rule: a string is a regex fullmatched on the path; a list matches by suffix."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path == name or path.endswith("." + name) for name in spec)
