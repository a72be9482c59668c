"""params.yaml is checked once: unknown keys, wrong types, out-of-range values name the key."""

import re
from pathlib import Path

import pydantic
import pytest
import yaml

from anodiff.config import Infer, infer_settings_from_meta, load_params, parse_params, read_yaml, to_dict
from anodiff.errors import ConfigError
from conftest import _merge

ROOT = Path(__file__).resolve().parents[1]


def test_repository_params_load():
    p = load_params(ROOT / "params.yaml")
    assert p.data.image_size == 64 and p.synth.n_test_normal == 40
    assert p.data.marble_anomalous == ("crack", "dot")  # lists become tuples
    assert isinstance(p.gan.lr, float)
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        p.data.image_size = 32


def _raw():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def parse(over: dict):
    """params.yaml with `over` merged in (the models have no defaults of their own)."""
    raw = _raw()
    _merge(raw, over)
    return parse_params(raw)


def test_params_yaml_is_the_one_source_of_defaults():
    """No model field has a default: a key missing from params.yaml is an error naming it."""
    for model in (Infer, type(load_params(ROOT / "params.yaml").ddpm)):
        assert all(f.is_required() for f in model.model_fields.values()), model
    raw = _raw()
    del raw["infer"]["guidance"]
    with pytest.raises(ConfigError, match=r"params\.yaml: infer\.guidance: missing; every key must be set"):
        parse_params(raw)
    assert parse({"data": {"image_size": 32}}).data.image_size == 32


@pytest.mark.parametrize("raw, key", [
    ({"data": {"imagesize": 64}}, "data.imagesize"),             # the typo dvc exp run -S accepts
    ({"sed": 1}, "sed"),
    ({"data": {"augment": {"flip": 0.5}}}, "data.augment.flip"),
])
def test_unknown_key_is_named(raw, key):
    with pytest.raises(ConfigError, match=rf"params\.yaml: {key}: unknown key; allowed under"):
        parse(raw)


@pytest.mark.parametrize("raw, key", [
    ({"gan": {"lr_critic": 0.002}}, "gan.lr_critic"),           # removed keys: an old `-S` says why
    ({"gan": {"spectral_norm": True}}, "gan.spectral_norm"),
    ({"gan": {"ema_decay": 0.9}}, "gan.ema_decay"),
])
def test_removed_gan_stabiliser_is_named_with_why(raw, key):
    with pytest.raises(ConfigError, match=rf"params\.yaml: {key}: removed: it measured no gain on val"):
        parse(raw)


@pytest.mark.parametrize("raw, key", [
    ({"data": {"image_size": "64"}}, "data.image_size"),
    ({"data": {"image_size": 64.5}}, "data.image_size"),
    ({"data": {"channels": True}}, "data.channels"),                # bool is not 1
    ({"data": {"skip_bad_files": "yes"}}, "data.skip_bad_files"),
    ({"gan": {"lr": "fast"}}, "gan.lr"),
    ({"data": {"marble_normal": "good"}}, "data.marble_normal"),
    ({"data": {"augment": {"brightness": [0.9]}}}, "data.augment.brightness"),
    ({"data": "big"}, "data"),
])
def test_wrong_type_is_named(raw, key):
    with pytest.raises(ConfigError, match=rf"params\.yaml: {key}: "):
        parse(raw)


def test_choice_lists_what_is_allowed():
    with pytest.raises(ConfigError, match=r"ddpm\.noise: 'pink' is not one of 'gaussian', 'simplex'"):
        parse({"ddpm": {"noise": "pink"}})
    with pytest.raises(ConfigError, match=r"data\.layout: 'kaggle' is not one of 'auto', 'mvtec'"):
        parse({"data": {"layout": "kaggle"}})


@pytest.mark.parametrize("raw, key", [
    ({"data": {"contamination": 1.0}}, "data.contamination"),
    ({"data": {"contamination": -0.1}}, "data.contamination"),
    ({"data": {"val_fraction": 0}}, "data.val_fraction"),
    ({"data": {"augment": {"flip_p": 1.5}}}, "data.augment.flip_p"),
    ({"synth": {"n_test_normal": 0}}, "synth.n_test_normal"),
    ({"data": {"image_size": 4}}, "data.image_size"),
])
def test_out_of_range_is_named(raw, key):
    with pytest.raises(ConfigError, match=rf"params\.yaml: {key}: .* is out of range; allowed: "):
        parse(raw)


@pytest.mark.parametrize("raw, message", [
    ({"data": {"source": ""}}, "data.source: '' is empty; allowed: a non-empty string"),
    ({"data": {"marble_anomalous": ["crack", ""]}}, "data.marble_anomalous[1]: '' is empty"),
    ({"ddpm": {"lr": float("nan")}}, "ddpm.lr: nan is not a finite number"),
    ({"ddpm": {"channel_mults": []}}, "ddpm.channel_mults: [] must be a list of at least 1 entry"),
])
def test_empty_and_non_finite_values_are_named(raw, message):
    with pytest.raises(ConfigError, match=re.escape(f"params.yaml: {message}")):
        parse(raw)


def test_cross_field_checks_name_both_keys():
    with pytest.raises(ConfigError, match=r"infer\.t_start: 300 must be below ddpm\.timesteps \(300\)"):
        parse({"infer": {"t_start": 300}})
    with pytest.raises(ConfigError, match=r"data\.augment\.brightness"):
        parse({"data": {"augment": {"brightness": [1.1, 0.9]}}})
    with pytest.raises(ConfigError, match=r"data\.image_size: 30 must be divisible by 4"):
        parse({"data": {"image_size": 30}})


def test_the_level_plan_takes_one_value_or_a_list_per_level():
    """infer.t_start, infer.steps and infer.guidance: one value (for every level) or a list (one per
    level); the default is the plan of two levels the maps were always drawn with."""
    assert load_params(ROOT / "params.yaml").infer.plan() == [(30, 1, 0.0), (200, 5, 10.0)]
    one = parse({"infer": {"t_start": 50, "steps": 3, "guidance": 2}}).infer
    assert one.plan() == [(50, 3, 2.0)] and one.levels() == (50,)
    assert parse({"infer": {"t_start": [30, 100, 200], "steps": 2, "guidance": [0, 0, 10]}}).infer.plan() == \
        [(30, 2, 0.0), (100, 2, 0.0), (200, 2, 10.0)]
    assert parse({"infer": {"t_start": 30, "steps": [4], "guidance": 0}}).infer.plan() == [(30, 4, 0.0)]
    # the form is kept: meta.json holds the settings as written
    assert to_dict(one)["t_start"] == 50 and to_dict(one)["guidance"] == 2.0
    assert to_dict(parse({}).infer)["t_start"] == [30, 200]


def test_a_list_of_another_length_than_the_levels_names_both_keys_and_the_fix():
    # `dvc exp run -S infer.t_start=50` while steps and guidance are lists of two
    message = ("params.yaml: infer.steps: [1, 5] has 2 entries but infer.t_start has 1 noise level (50): give one "
               "value for every level, or one per level, e.g. -S infer.steps=1 -S infer.guidance=0")
    with pytest.raises(ConfigError, match=re.escape(message) + "$"):
        parse({"infer": {"t_start": 50}})
    message = ("params.yaml: infer.guidance: [10] has 1 entry but infer.t_start has 3 noise levels (30, 100, 200): "
               "give one value for every level, or one per level, e.g. -S infer.guidance=10")
    with pytest.raises(ConfigError, match=re.escape(message) + "$"):
        parse({"infer": {"t_start": [30, 100, 200], "steps": 1, "guidance": [10]}})


@pytest.mark.parametrize("over, message", [
    ({"t_start": [30, 300]}, "infer.t_start[1]: 300 must be below ddpm.timesteps (300)"),
    ({"t_start": 300, "steps": 1, "guidance": 0}, "infer.t_start: 300 must be below ddpm.timesteps (300)"),
    ({"t_start": [30, 0]}, "infer.t_start[1]: 0 is out of range; allowed: a number in [1, inf]"),
    ({"t_start": 0}, "infer.t_start: 0 is out of range; allowed: a number in [1, inf]"),
    ({"t_start": []}, "infer.t_start: [] must be a list of at least 1 entry"),
    ({"t_start": "30"}, "infer.t_start: '30' is not an integer or a list of them"),
    ({"t_start": True}, "infer.t_start: True is not an integer or a list of them"),
    ({"steps": [1, 2.5]}, "infer.steps[1]: 2.5 is not an integer"),
    ({"guidance": -1}, "infer.guidance: -1 is out of range; allowed: a number in [0, inf]"),
    ({"guidance": [0, -1]}, "infer.guidance[1]: -1 is out of range; allowed: a number in [0, inf]"),
    ({"steps": [1, 202]}, "infer.steps: 202 at noise level 200 (infer.t_start) must be at most t + 1 = 201"),
    ({"t_start": 30, "steps": 40, "guidance": 0}, "infer.steps: 40 at noise level 30 (infer.t_start) "
                                                  "must be at most t + 1 = 31"),
])
def test_level_plan_errors_name_the_key(over, message):
    with pytest.raises(ConfigError, match=re.escape(f"params.yaml: {message}")):
        parse({"infer": over})


@pytest.mark.parametrize("key, message", [
    ("t_starts", "params.yaml: infer.t_starts: folded into infer.t_start, which now takes a list of noise levels"),
    ("level_steps", "params.yaml: infer.level_steps: folded into infer.steps, which now takes a list, one entry "
                    "per noise level of infer.t_start"),
])
def test_removed_level_keys_say_what_replaced_them(tmp_path, key, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse({"infer": {key: [30, 200]}})  # `dvc exp run -S infer.t_starts=...` adds the old key
    # a params file from before the fold, as it was
    raw = _raw()
    raw["infer"].update(t_start=30, steps=1, t_starts=[30, 200], level_steps=[1, 5])
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"params\.yaml: infer\.t_starts: folded into infer\.t_start"):
        load_params(path)


@pytest.mark.parametrize("old, plan", [
    ({"t_start": 30, "steps": 1, "t_starts": [30, 200], "level_steps": [1, 5], "guidance": [0.0, 10.0]},
     [(30, 1, 0.0), (200, 5, 10.0)]),                                        # the default until the fold
    ({"t_start": 5, "steps": 2, "t_starts": [], "level_steps": [], "guidance": []}, [(5, 2, 0.0)]),
    ({"t_start": 5, "steps": 2, "t_starts": [3, 6], "level_steps": [], "guidance": []}, [(3, 2, 0.0), (6, 2, 0.0)]),
    ({"t_start": 5, "steps": 1, "t_starts": [], "level_steps": [3], "guidance": [4.0]}, [(5, 3, 4.0)]),
])
def test_an_older_meta_json_s_settings_give_the_same_plan(old, plan):
    """`anodiff predict` reads infer's settings from data/maps/<method>/meta.json: one written
    before t_starts and level_steps were folded into t_start and steps still loads."""
    stored = {**to_dict(parse({}).infer), **old}
    settings = Infer.model_validate(infer_settings_from_meta(stored))
    assert settings.plan() == plan
    assert not {"t_starts", "level_steps"} & to_dict(settings).keys()
    today = to_dict(parse({}).infer)
    assert infer_settings_from_meta(today) is today and infer_settings_from_meta(None) is None


def test_load_params_file_errors(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("data:\n  imagesize: 64\n")
    with pytest.raises(ConfigError, match=r"data\.imagesize: unknown key"):
        load_params(path)
    path.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(path)
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "missing.yaml")
    path.write_text("seed: 0\ndata:\n  image_size: 32\n  image_size: 64\n")  # YAML itself keeps the last
    duplicate = r"params\.yaml: not valid YAML at line 4, column 3: duplicate key 'image_size'"
    with pytest.raises(ConfigError, match=duplicate):
        load_params(path)
    path.write_bytes(b"seed: \xff\n")
    with pytest.raises(ConfigError, match=r"params\.yaml: not a UTF-8 text file"):
        load_params(path)
    with pytest.raises(ConfigError, match=rf"{re.escape(str(tmp_path))}: cannot be read"):
        load_params(tmp_path)


def test_yaml_merge_keys_may_override():
    assert read_yaml("a: &x {b: 1, c: 2}\nd:\n  <<: *x\n  b: 3\n")["d"] == {"b": 3, "c": 2}


def test_to_dict_round_trips():
    p = parse({"seed": 3, "data": {"image_size": 32}})
    assert parse_params(to_dict(p)) == p


@pytest.mark.parametrize("text, value", [
    ("5e-05", 5e-5),      # what `dvc exp run -S gan.lr=5e-5` writes (YAML 1.1 would give a string)
    ("5E-5", 5e-5),
    ("1e4", 1e4),
    ("1.0e5", 1e5),
    (".5", 0.5),
    ("-.5", -0.5),
    ("-2.5e-3", -2.5e-3),
    ("+1.5", 1.5),
    ("0.0001", 1e-4),
])
def test_floats_in_any_notation_are_floats(text, value):
    got = read_yaml(f"x: {text}\n")["x"]
    assert type(got) is float and got == value


@pytest.mark.parametrize("text, value", [
    ("10", 10), ("-3", -3), ("0", 0), ("true", True), ("false", False),
    ("'5e-05'", "5e-05"), ("1e", "1e"), ("e5", "e5"), ("1.2.3", "1.2.3"), ("abc", "abc"),
])
def test_ints_bools_and_strings_keep_their_type(text, value):
    got = read_yaml(f"x: {text}\n")["x"]
    assert type(got) is type(value) and got == value


def test_load_params_reads_an_exponent_float(tmp_path):
    raw = _raw()
    raw["gan"]["lr"] = "@LR@"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False).replace("'@LR@'", "5e-05"))
    p = load_params(path)
    assert p.gan.lr == 5e-5 and isinstance(p.gan.lr, float)
    assert isinstance(p.data.image_size, int) and isinstance(p.data.augment.rot90, bool)


@pytest.mark.parametrize("size, message", [(16, r"patchcore\.image_size: .*(32|greater)"),
                                           (40, r"patchcore\.image_size: 40 must be a multiple of 16")])
def test_an_extractor_size_its_strides_cannot_take_is_named(size, message):
    with pytest.raises(ConfigError, match=message):
        parse({"patchcore": {"image_size": size}})
