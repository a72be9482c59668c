"""params.yaml -> typed, frozen sections, checked once.

`dvc exp run -S data.imagesize=64` silently adds a new key (treeverse/dvc#6282), so every key
is checked here: an unknown key, a wrong type or an out-of-range value raises ConfigError with
one line naming the key, the value and what is allowed, before a stage does any work.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from anodiff.errors import ConfigError


def _in(lo=None, hi=None, lo_open=False, hi_open=False):
    """A range check stored in the field's metadata: (check, description)."""

    def check(v):
        if lo is not None and (v <= lo if lo_open else v < lo):
            return False
        if hi is not None and (v >= hi if hi_open else v > hi):
            return False
        return True

    left = "(" if lo_open else "["
    right = ")" if hi_open else "]"
    desc = f"a number in {left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
    return {"check": check, "desc": desc}


def F(default, **rng):
    """A field with a default and an optional range check."""
    meta = _in(**rng) if rng else {}
    if isinstance(default, (list, tuple)):
        return field(default=tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Augment:
    balance: bool = True
    flip_p: float = F(0.9, lo=0, hi=1)
    rot90: bool = True
    brightness: tuple[float, float] = F((0.9, 1.1))


@dataclass(frozen=True)
class Data:
    source: str = "synthetic"
    layout: Literal["auto", "mvtec", "marble", "folder"] = "auto"
    image_size: int = F(64, lo=8, hi=1024)
    channels: Literal[1, 3] = 3
    contamination: float = F(0.1, lo=0, hi=1, hi_open=True)
    skip_bad_files: bool = False
    val_fraction: float = F(0.25, lo=0, hi=1, lo_open=True, hi_open=True)
    train_anomalous_fraction: float = F(0.3, lo=0, hi=1, hi_open=True)
    marble_normal: tuple[str, ...] = F(("good",))
    marble_anomalous: tuple[str, ...] = F(("crack", "dot"))
    augment: Augment = field(default_factory=Augment)


@dataclass(frozen=True)
class Synth:
    n_train_normal: int = F(160, lo=1)
    n_train_anomalous: int = F(48, lo=0)
    n_val_normal: int = F(24, lo=1)
    n_val_anomalous: int = F(24, lo=1)
    n_test_normal: int = F(40, lo=1)
    n_test_anomalous: int = F(60, lo=1)
    joint_fraction: float = F(0.15, lo=0, hi=1)


@dataclass(frozen=True)
class DDPM:
    noise: Literal["gaussian", "simplex"] = "gaussian"
    timesteps: int = F(300, lo=2, hi=10000)
    schedule: Literal["linear", "cosine"] = "linear"
    beta_start: float = F(1e-4, lo=0, hi=1, lo_open=True, hi_open=True)
    beta_end: float = F(0.02, lo=0, hi=1, lo_open=True, hi_open=True)
    base_channels: int = F(32, lo=1)
    channel_mults: tuple[int, ...] = F((1, 2, 2))
    num_res_blocks: int = F(1, lo=1)
    attention_resolutions: tuple[int, ...] = F((16,))
    epochs: int = F(60, lo=1)
    batch_size: int = F(16, lo=1)
    train_crop: int = F(32, lo=0)
    lr: float = F(3e-4, lo=0, lo_open=True)
    grad_clip: float = F(1.0, lo=0, lo_open=True)
    ema_decay: float = F(0.995, lo=0, hi=1, hi_open=True)
    simplex_octaves: int = F(6, lo=1, hi=12)
    simplex_persistence: float = F(0.8, lo=0, hi=1, lo_open=True)
    simplex_frequency: float = F(64.0, lo=0, lo_open=True)


@dataclass(frozen=True)
class Robust:
    loss: Literal["mse", "huber", "lts"] = "huber"
    huber_delta: float = F(0.5, lo=0, lo_open=True)
    lts_keep: float = F(0.8, lo=0, hi=1, lo_open=True)


@dataclass(frozen=True)
class GAN:
    lr: float = F(5e-4, lo=0, lo_open=True)
    batch_size: int = F(16, lo=2)
    epochs: int = F(5, lo=1)
    n_critic: int = F(5, lo=1)
    gp_weight: float = F(10.0, lo=0)
    mse_weight: float = F(1.0, lo=0)
    t: int = F(30, lo=1)
    denoise_steps: int = F(1, lo=1)
    bound: float = F(1.5, lo=0, lo_open=True)
    base_channels: int = F(32, lo=1)
    n_blocks: int = F(4, lo=1)
    grad_clip: float = F(1.0, lo=0, lo_open=True)
    crop: int = F(32, lo=0)
    residual: bool = True
    mse_target: Literal["gaussian", "paired", "input"] = "gaussian"


@dataclass(frozen=True)
class Infer:
    t_start: int = F(30, lo=1)
    steps: int = F(1, lo=1)
    t_starts: tuple[int, ...] = F(())
    n_seeds: int = F(8, lo=1)
    level_steps: tuple[int, ...] = F((), lo=1)
    guidance: tuple[float, ...] = F((), lo=0)
    error: Literal["abs", "sq", "ssim", "feature", "combined"] = "abs"
    sigma: float = F(2.0, lo=0)
    normalize: Literal["auto", "none", "image", "pixel", "texture", "texture2", "mahalanobis"] = "auto"
    score: Literal["max", "topk"] = "max"
    topk: float = F(0.01, lo=0, hi=1, lo_open=True)
    batch_size: int = F(16, lo=1)


@dataclass(frozen=True)
class Params:
    seed: int = F(0, lo=0)
    data: Data = field(default_factory=Data)
    synth: Synth = field(default_factory=Synth)
    ddpm: DDPM = field(default_factory=DDPM)
    robust: Robust = field(default_factory=Robust)
    gan: GAN = field(default_factory=GAN)
    infer: Infer = field(default_factory=Infer)

    def __post_init__(self):
        # Cross-field checks: they name both keys.
        T = self.ddpm.timesteps
        for key, value in [("infer.t_start", self.infer.t_start), ("gan.t", self.gan.t)]:
            if value >= T:
                raise ConfigError(f"params.yaml: {key}: {value} must be below ddpm.timesteps ({T})")
        for v in self.infer.t_starts:
            if not 1 <= v < T:
                raise ConfigError(f"params.yaml: infer.t_starts: {v} must be in [1, ddpm.timesteps={T})")
        levels = self.infer.t_starts or (self.infer.t_start,)
        where = "infer.t_starts" if self.infer.t_starts else "[infer.t_start]"
        for key in ("level_steps", "guidance"):
            value = getattr(self.infer, key)
            if value and len(value) != len(levels):
                raise ConfigError(f"params.yaml: infer.{key}: {list(value)} must have one entry per noise level "
                                  f"({where} has {len(levels)}), or be []")
        for t, k in zip(levels, self.infer.level_steps or (self.infer.steps,) * len(levels)):
            if k > t + 1:
                raise ConfigError(f"params.yaml: infer steps {k} at noise level {t} must be at most t + 1 = {t + 1}")
        lo, hi = self.data.augment.brightness
        if not 0 < lo <= hi:
            raise ConfigError(f"params.yaml: data.augment.brightness: {[lo, hi]} must be [low, high] with 0 < low <= high")
        if self.ddpm.beta_start >= self.ddpm.beta_end:
            raise ConfigError("params.yaml: ddpm.beta_start must be below ddpm.beta_end")
        size = self.data.image_size
        factor = 2 ** (len(self.ddpm.channel_mults) - 1)
        for key, value in [("data.image_size", size), ("ddpm.train_crop", self.ddpm.train_crop),
                           ("gan.crop", self.gan.crop)]:
            if value % factor:
                raise ConfigError(f"params.yaml: {key}: {value} must be divisible by {factor} "
                                  f"(2 ** (len(ddpm.channel_mults) - 1))")


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        return "a list"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _coerce(key: str, tp, value):
    """Check `value` against the annotation `tp`; return it converted (lists -> tuples)."""
    bad = ConfigError(f"params.yaml: {key}: {value!r} is not {_type_name(tp)}")
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        # bool is an int subclass: `true` must not pass as channels=1
        if isinstance(value, bool) or value not in allowed:
            raise bad
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad
        args = typing.get_args(tp)
        item_tp = args[0]
        if len(args) == 2 and args[1] is not Ellipsis:
            if len(value) != 2:
                raise ConfigError(f"params.yaml: {key}: {value!r} must be a list of 2 numbers")
        return tuple(_coerce(f"{key}[{i}]", item_tp, v) for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str) or not value:
            raise bad
        return value
    raise TypeError(f"unsupported annotation {tp} for {key}")


def _build(cls, raw, prefix: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"params.yaml: {prefix.rstrip('.') or 'top level'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"params.yaml: {prefix}{unknown[0]}: unknown key; allowed under "
                          f"{prefix.rstrip('.') or 'top level'}: {', '.join(fields)}")
    kwargs = {}
    for name, value in raw.items():
        key, tp = prefix + name, hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key + ".")
            continue
        value = _coerce(key, tp, value)
        meta = fields[name].metadata
        if "check" in meta:
            for v in value if isinstance(value, tuple) else (value,):
                if not meta["check"](v):
                    raise ConfigError(f"params.yaml: {key}: {value!r} is out of range; allowed: {meta['desc']}")
        kwargs[name] = value
    return cls(**kwargs)


def parse_params(raw: dict) -> Params:
    """Typed params from an already-loaded mapping (missing keys take their defaults)."""
    return _build(Params, raw, "")


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found (run from the repository root)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    return parse_params(raw)


def to_dict(obj) -> dict:
    """Plain, JSON/YAML-friendly dict of a params section (tuples become lists)."""

    def plain(v):
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(obj))
