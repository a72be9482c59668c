"""params.yaml -> typed, frozen sections, checked once (pydantic v2 models).

params.yaml is the one source of every value: the models here hold types and ranges only, no
defaults, so a key missing from params.yaml is an error rather than a second, drifting default.
`dvc exp run -S data.imagesize=64` silently adds a new key (treeverse/dvc#6282), so every key is
checked: an unknown key, a wrong type or an out-of-range value raises ConfigError with one line
naming the key, the value and what is allowed, before a stage does any work.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Annotated, Literal

import annotated_types
import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, ValidationError
from pydantic_core import PydanticCustomError

from anodiff.errors import ConfigError


def Num(tp, lo=None, hi=None, lo_open=False, hi_open=False):
    """`tp` (int or float, never bool) within a range; open ends exclude the bound."""
    bounds = {}
    if lo is not None:
        bounds["gt" if lo_open else "ge"] = lo
    if hi is not None:
        bounds["lt" if hi_open else "le"] = hi
    return Annotated[tp, Field(**bounds)]


def List(item, min_length: int = 0):
    """A YAML list, held as a tuple (frozen); at least `min_length` entries."""
    return Annotated[tuple[item, ...], Field(strict=False, min_length=min_length)]


def _not_bool(value):
    # a Literal of ints compares by ==, so `true` would pass as channels=1
    if isinstance(value, bool):
        raise PydanticCustomError("literal_error", "a boolean is not a choice here")
    return value


class Section(BaseModel):
    # strict: "64" is not 64; extra="forbid": a misspelt key is an error; no NaN or inf
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)


#: a speed-up: `auto` (on where it pays, see `accelerated`), or true / false
Accel = bool | Literal["auto"]


def accelerated(value, device, precision: bool = False) -> bool:
    """Whether an Accel param is on for `device` (a torch.device or its type's name).

    `auto` is on with CUDA. For mixed precision (`precision=True`: `ddpm.amp`, `infer.amp`) it is
    also on for a CPU with native bfloat16 arithmetic (runtime.native_bf16: AVX512-BF16 or AMX),
    where it made training 1.7x and inference 2x faster (docs/performance.md); a CPU without
    it would emulate bfloat16, slower than float32, so `auto` stays off there."""
    kind = getattr(device, "type", str(device))
    if value != "auto":
        return bool(value)
    if kind == "cuda":
        return True
    if precision and kind == "cpu":
        from anodiff.runtime import native_bf16  # torch: only callers that already hold a device get here
        return native_bf16()
    return False


class Augment(Section):
    balance: bool
    flip_p: Num(float, 0, 1)
    rot90: bool
    brightness: Annotated[tuple[float, float], Field(strict=False)]


class Data(Section):
    source: Annotated[str, Field(min_length=1)]
    layout: Literal["auto", "mvtec", "marble", "folder"]
    image_size: Num(int, 8, 1024)
    channels: Annotated[Literal[1, 3], BeforeValidator(_not_bool)]
    contamination: Num(float, 0, 1, hi_open=True)
    skip_bad_files: bool
    val_fraction: Num(float, 0, 1, lo_open=True, hi_open=True)
    train_anomalous_fraction: Num(float, 0, 1, hi_open=True)
    marble_normal: List(Annotated[str, Field(min_length=1)])
    marble_anomalous: List(Annotated[str, Field(min_length=1)])
    augment: Augment


class Synth(Section):
    n_train_normal: Num(int, 1)
    n_train_anomalous: Num(int, 0)
    n_val_normal: Num(int, 1)
    n_val_anomalous: Num(int, 1)
    n_test_normal: Num(int, 1)
    n_test_anomalous: Num(int, 1)
    joint_fraction: Num(float, 0, 1)


class DDPM(Section):
    noise: Literal["gaussian", "simplex"]
    timesteps: Num(int, 2, 10000)
    schedule: Literal["linear", "cosine"]
    beta_start: Num(float, 0, 1, lo_open=True, hi_open=True)
    beta_end: Num(float, 0, 1, lo_open=True, hi_open=True)
    base_channels: Num(int, 1)
    channel_mults: List(Num(int, 1), min_length=1)  # one entry per resolution level
    num_res_blocks: Num(int, 1)
    attention_resolutions: List(Num(int, 1))
    epochs: Num(int, 1)
    batch_size: Num(int, 1)
    train_crop: Num(int, 0)
    lr: Num(float, 0, lo_open=True)
    lr_schedule: Literal["constant", "cosine"]
    grad_clip: Num(float, 0, lo_open=True)
    ema_decay: Num(float, 0, 1, hi_open=True)
    simplex_octaves: Num(int, 1, 12)
    simplex_persistence: Num(float, 0, 1, lo_open=True)
    simplex_frequency: Num(float, 0, lo_open=True)
    amp: Accel
    channels_last: Accel


class Robust(Section):
    loss: Literal["mse", "huber", "lts"]
    huber_delta: Num(float, 0, lo_open=True)
    lts_keep: Num(float, 0, 1, lo_open=True)


class GAN(Section):
    lr: Num(float, 0, lo_open=True)
    eval_every: Num(int, 0)
    batch_size: Num(int, 2)
    epochs: Num(int, 1)
    n_critic: Num(int, 1)
    gp_weight: Num(float, 0)
    mse_weight: Num(float, 0)
    t: Num(int, 1)
    denoise_steps: Num(int, 1)
    bound: Num(float, 0, lo_open=True)
    base_channels: Num(int, 1)
    n_blocks: Num(int, 1)
    grad_clip: Num(float, 0, lo_open=True)
    crop: Num(int, 0)
    residual: bool


#: PerLevel's two forms, named in pydantic's error locations (never a key: they hold spaces)
_ONE, _MANY = "one value", "a list"


def PerLevel(item):
    """`item` (the value at every noise level) or a non-empty list of them (one per level, held
    as a tuple); the form is kept, so the settings read back as written."""
    return Annotated[Annotated[item, Tag(_ONE)] | Annotated[List(item, min_length=1), Tag(_MANY)],
                     Discriminator(lambda v: _MANY if isinstance(v, (list, tuple)) else _ONE)]


class Infer(Section):
    t_start: PerLevel(Num(int, 1))  # the noise level, or several: one raw map each
    steps: PerLevel(Num(int, 1))  # DDIM steps at every level, or one entry per level
    guidance: PerLevel(Num(float, 0))  # DDAD's weight at every level, or one entry per level
    n_seeds: Num(int, 1)
    error: Literal["abs", "sq", "feature"]
    adapt_steps: Num(int, 0)
    adapt_distill: Num(float, 0)
    memory: bool
    sigma: Num(float, 0)
    normalize: Literal["auto", "none", "image", "pixel", "texture", "texture2", "mahalanobis"]
    score: Literal["max", "topk"]
    topk: Num(float, 0, 1, lo_open=True)
    batch_size: Num(int, 1)
    amp: Accel
    channels_last: Accel

    def levels(self) -> tuple[int, ...]:
        """The noise levels of t_start, in order."""
        return self.t_start if isinstance(self.t_start, tuple) else (self.t_start,)

    def plan(self) -> list[tuple[int, int, float]]:
        """(t_start, steps, guidance) per noise level: each level of t_start with its entry of
        steps and guidance, or their one value where they give one for every level."""
        if mismatch := _level_mismatch(self):
            raise ValueError(mismatch)
        ts = self.levels()
        per_level = [v if isinstance(v, tuple) else (v,) * len(ts) for v in (self.steps, self.guidance)]
        return [(t, k, float(w)) for t, k, w in zip(ts, *per_level, strict=True)]


#: infer keys that are gone: what replaced them (an old params file or `-S` is told, not just refused)
REMOVED_KEYS = {
    "gan.lr_critic": "removed: it measured no gain on val; the critic takes gan.lr (CHANGELOG.md)",
    "gan.spectral_norm": "removed: it measured no gain on val (CHANGELOG.md)",
    "gan.ema_decay": "removed: it measured no gain on val (CHANGELOG.md)",
    "infer.t_starts": "folded into infer.t_start, which now takes a list of noise levels "
                      "(e.g. -S 'infer.t_start=[30,200]')",
    "infer.level_steps": "folded into infer.steps, which now takes a list, one entry per noise level "
                         "of infer.t_start (e.g. -S 'infer.steps=[1,5]')",
}


def _removed_key(raw: dict) -> str | None:
    """The first key of REMOVED_KEYS that the raw params still set, with what replaced it."""
    for dotted, instead in REMOVED_KEYS.items():
        *sections, key = dotted.split(".")
        node = raw
        for part in sections:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and key in node:
            return f"params.yaml: {dotted}: {instead}"
    return None


def _fmt(value) -> str:
    """A per-level value as a user writes it: 0 and 10 for guidance, not 0.0 and 10.0."""
    if isinstance(value, tuple):
        return "[" + ", ".join(map(_fmt, value)) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _level_mismatch(infer: Infer) -> str | None:
    """The message for a list of steps or guidance of another length than infer.t_start's."""
    ts = infer.levels()
    wrong = [(key, getattr(infer, key)) for key in ("steps", "guidance")
             if isinstance(getattr(infer, key), tuple) and len(getattr(infer, key)) != len(ts)]
    if not wrong:
        return None
    key, value = wrong[0]
    n, s = len(value), "" if len(ts) == 1 else "s"
    fix = " ".join(f"-S infer.{k}={_fmt(v[0])}" for k, v in wrong)
    return (f"params.yaml: infer.{key}: {_fmt(value)} has {n} entr{'y' if n == 1 else 'ies'} but infer.t_start "
            f"has {len(ts)} noise level{s} ({', '.join(map(str, ts))}): give one value for every level, "
            f"or one per level, e.g. {fix}")


def infer_settings_from_meta(stored):
    """infer's settings as a meta.json holds them, in today's keys: a meta.json written before
    t_starts and level_steps were folded into t_start and steps is converted to the same plan.
    Anything else is returned as it is (Infer.model_validate judges it)."""
    if not isinstance(stored, dict) or not {"t_starts", "level_steps"} & stored.keys():
        return stored
    new = {k: v for k, v in stored.items() if k not in ("t_starts", "level_steps")}
    t_starts, level_steps = stored.get("t_starts") or [], stored.get("level_steps") or []
    if t_starts:
        new["t_start"] = list(t_starts)
    if level_steps:
        new["steps"] = list(level_steps)
    if not stored.get("guidance"):  # [] was unguided
        new["guidance"] = 0.0
    return new


class PatchCore(Section):
    image_size: Num(int, 32, 1024)  # the feature extractor's input size (a multiple of 16)
    coreset: Num(float, 0, 1, lo_open=True)
    projection: Num(int, 0)
    sigma: Num(float, 0)
    max_patches: Num(int, 1)
    batch_size: Num(int, 1)


class Evaluate(Section):
    normal_quantile: Num(float, 0, 1, lo_open=True)  # normal-only val: thresholds at this quantile


class Params(Section):
    seed: Num(int, 0)
    data: Data
    synth: Synth
    ddpm: DDPM
    robust: Robust
    gan: GAN
    infer: Infer
    patchcore: PatchCore
    evaluate: Evaluate


def _cross_checks(p: Params) -> None:
    """Checks that involve two keys: the message names both."""
    T = p.ddpm.timesteps
    levels = [(f"infer.t_start[{i}]" if isinstance(p.infer.t_start, tuple) else "infer.t_start", t)
              for i, t in enumerate(p.infer.levels())]
    for key, value in [*levels, ("gan.t", p.gan.t)]:
        if value >= T:
            raise ConfigError(f"params.yaml: {key}: {value} must be below ddpm.timesteps ({T})")
    if mismatch := _level_mismatch(p.infer):
        raise ConfigError(mismatch)
    for t, k, _ in p.infer.plan():
        if k > t + 1:
            raise ConfigError(f"params.yaml: infer.steps: {k} at noise level {t} (infer.t_start) "
                              f"must be at most t + 1 = {t + 1}")
    if p.patchcore.image_size % 16:
        raise ConfigError(f"params.yaml: patchcore.image_size: {p.patchcore.image_size} must be a multiple of 16 "
                          "(the feature extractor's stride-16 endpoint)")
    lo, hi = p.data.augment.brightness
    if not 0 < lo <= hi:
        raise ConfigError(f"params.yaml: data.augment.brightness: {[lo, hi]} must be [low, high] with 0 < low <= high")
    if p.ddpm.beta_start >= p.ddpm.beta_end:
        raise ConfigError("params.yaml: ddpm.beta_start must be below ddpm.beta_end")
    factor = 2 ** (len(p.ddpm.channel_mults) - 1)
    for key, value in [("data.image_size", p.data.image_size), ("ddpm.train_crop", p.ddpm.train_crop),
                       ("gan.crop", p.gan.crop)]:
        if value % factor:
            raise ConfigError(f"params.yaml: {key}: {value} must be divisible by {factor} "
                              f"(2 ** (len(ddpm.channel_mults) - 1))")


# ---------------------------------------------------------------- pydantic errors -> one line
_TYPE_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def _field_at(loc) -> tuple[type | None, object]:
    """(the section model holding the last named key, the annotation at loc) for an error's loc."""
    model, tp = None, Params
    for part in loc:
        if isinstance(part, int):  # an item of a list
            tp = typing.get_args(_strip(tp))[0]
        elif part in (_ONE, _MANY):  # a PerLevel's form: the list, or the whole (a value or a list)
            tp = typing.get_args(_strip(tp))[1] if part == _MANY else tp
        elif isinstance(_strip(tp), type) and issubclass(_strip(tp), BaseModel):
            model = _strip(tp)
            if part not in model.model_fields:
                return model, None
            info = model.model_fields[part]
            tp = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        else:
            return model, None
    return model, tp


def _strip(tp):
    return typing.get_args(tp)[0] if typing.get_origin(tp) is Annotated else tp


def _describe(tp, with_range: bool = False) -> str:
    """"one of 'a', 'b'", 'a list', 'an integer', or with_range 'a number in [0, 1)'."""
    base = _strip(tp)
    if typing.get_origin(base) is typing.Union:  # PerLevel: one value or a list of them
        one = _describe(typing.get_args(base)[0], with_range)
        return one if with_range else f"{one} or a list of them"
    if typing.get_origin(base) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(base))
    if typing.get_origin(base) is tuple:
        args = typing.get_args(base)
        return f"a list of {len(args)} numbers" if args and args[-1] is not Ellipsis else "a list"
    bounds = {}
    for meta in typing.get_args(tp)[1:] if with_range and typing.get_origin(tp) is Annotated else ():
        for m in getattr(meta, "metadata", [meta]):
            for name in ("ge", "gt", "le", "lt"):
                if isinstance(m, getattr(annotated_types, name.capitalize())):
                    bounds[name] = getattr(m, name)
    if bounds:
        lo = bounds.get("ge", bounds.get("gt", "-inf"))
        hi = bounds.get("le", bounds.get("lt", "inf"))
        return f"a number in {'(' if 'gt' in bounds else '['}{lo}, {hi}{')' if 'lt' in bounds else ']'}"
    return _TYPE_NAMES.get(getattr(base, "__name__", ""), str(base))


def _message(err: dict, raw: dict) -> str:
    loc = [p for p in err["loc"]]
    key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc
                  if p not in (_ONE, _MANY)).lstrip(".") or "top level"
    kind = err["type"]
    model, tp = _field_at(loc)
    if kind == "extra_forbidden":
        parent = ".".join(str(p) for p in loc[:-1]) or "top level"
        return f"params.yaml: {key}: unknown key; allowed under {parent}: {', '.join(model.model_fields)}"
    if kind == "missing" and loc and isinstance(loc[-1], int):  # a fixed-length list too short
        key = key.rsplit("[", 1)[0]
        return f"params.yaml: {key}: must be {_describe(_field_at(loc[:-1])[1])}"
    if kind == "missing":
        return (f"params.yaml: {key}: missing; every key must be set in params.yaml "
                f"(the repository's params.yaml lists them all)")
    value = err.get("input")
    if kind in ("model_type", "dict_type"):
        return f"params.yaml: {key}: expected a mapping, got {value!r}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"params.yaml: {key}: {value!r} is out of range; allowed: {_describe(tp, with_range=True)}"
    if kind == "string_too_short":
        return f"params.yaml: {key}: {value!r} is empty; allowed: a non-empty string"
    if kind == "finite_number":
        return f"params.yaml: {key}: {value!r} is not a finite number"
    if kind in ("too_short", "too_long") and typing.get_origin(_strip(tp)) is tuple:
        if typing.get_args(_strip(tp))[-1] is Ellipsis:  # a list of any length, with a minimum
            n = err["ctx"]["min_length"]
            return f"params.yaml: {key}: {value!r} must be a list of at least {n} entr{'y' if n == 1 else 'ies'}"
        return f"params.yaml: {key}: {value!r} must be {_describe(tp)}"
    return f"params.yaml: {key}: {value!r} is not {_describe(tp) if tp is not None else err['msg']}"


def parse_params(raw: dict) -> Params:
    """Typed params from an already-loaded mapping; every key must be present."""
    if not isinstance(raw, dict):
        raise ConfigError(f"params.yaml: top level: expected a mapping, got {raw!r}")
    if removed := _removed_key(raw):
        raise ConfigError(removed)
    try:
        p = Params.model_validate(raw)
    except ValidationError as exc:
        # a misspelt key first (its correct twin is then reported missing), missing keys last
        order = {"extra_forbidden": 0, "missing": 2}
        first = min(exc.errors(), key=lambda e: order.get(e["type"], 1))
        raise ConfigError(_message(first, raw)) from None
    _cross_checks(p)
    return p


class ParamsLoader(yaml.SafeLoader):
    """yaml.SafeLoader that also reads YAML 1.2 floats: `5e-05`, `1E4`, `-.5`, `1.0e5`.

    PyYAML follows YAML 1.1, where a float needs a dot and a signed exponent, so the `5e-05`
    that `dvc exp run -S gan.lr=5e-5` writes (DVC's YAML is 1.2) would load as a string. Ints
    (`10`), booleans (`true`) and everything else resolve as before; this resolver only catches
    plain scalars that no YAML 1.1 resolver claimed.

    A key given twice in one mapping is an error: plain YAML keeps the last value silently, so a
    hand-edited `image_size: 32` above the original `image_size: 64` would be ignored.
    """

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *alias` may be overridden, by design
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: SafeLoader reports it below
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        return super().construct_mapping(node, deep)


ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$"),
    list("-+0123456789."))


def read_yaml(text: str):
    """Parse a params file's text with ParamsLoader (floats in any notation are floats)."""
    return yaml.load(text, Loader=ParamsLoader)


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        raw = read_yaml(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found (run from the repository root)") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {exc.start})") from None
    except OSError as exc:  # a folder, no permission
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    except yaml.YAMLError as exc:
        # PyYAML's message is several lines ("while parsing ...", marks); its problem and mark are one
        mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = problem or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {what}") from None
    return parse_params(raw)


def to_dict(obj) -> dict:
    """Plain, JSON/YAML-friendly dict of a params section (tuples become lists)."""
    return obj.model_dump(mode="json")
