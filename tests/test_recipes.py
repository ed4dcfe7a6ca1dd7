"""Recipes: defaults, packaged YAML, `--set` overrides, schema errors, value checks, save/load."""
import dataclasses
from pathlib import Path

import pytest
import yaml

from mobilezoo.errors import RecipeError
from mobilezoo.recipes import DataCfg, ModelCfg, OptimCfg, Recipe, TrainCfg, list_recipes, load_recipe

PACKAGED = Path(__file__).resolve().parents[1] / "mobilezoo" / "recipes"


def _names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def test_defaults_load_without_a_file():
    r = load_recipe()
    assert r == Recipe()
    assert r.task == "classify"
    assert isinstance(r.model, ModelCfg) and isinstance(r.data, DataCfg)
    assert isinstance(r.optim, OptimCfg) and isinstance(r.train, TrainCfg)
    assert r.optim.lr > 0 and r.train.epochs >= 1 and r.train.precision in ("fp32", "bf16")
    assert isinstance(r.optim.betas, tuple)


def _assert_matches_yaml(recipe: Recipe, raw: dict, where: str = ""):
    """Every value written in the YAML file ended up in the recipe."""
    for key, value in raw.items():
        got = getattr(recipe, key)
        if isinstance(value, dict) and dataclasses.is_dataclass(got):
            _assert_matches_yaml(got, value, f"{where}{key}.")
        else:
            if isinstance(got, tuple):
                got = list(got)
            assert got == value, f"{where}{key}: {got!r} != {value!r}"


@pytest.mark.parametrize("name", ["classify_digits", "classify_imagefolder"])
def test_packaged_recipes_load_by_name(name):
    assert name in list_recipes()
    r = load_recipe(name)
    raw = yaml.safe_load((PACKAGED / f"{name}.yaml").read_text())
    _assert_matches_yaml(r, raw)
    # fields the file does not mention keep their defaults
    assert r.train.seed == TrainCfg().seed
    assert r.optim.betas == OptimCfg().betas


def test_packaged_recipe_by_path_equals_by_name():
    assert load_recipe(str(PACKAGED / "classify_digits.yaml")) == load_recipe("classify_digits")


def test_digits_recipe_values():
    r = load_recipe("classify_digits")
    assert r.data.name == "digits" and r.data.img_size == 32 and r.model.name == "tiny_moat_0"
    assert r.data.augment["hflip"] is False  # digits are not mirror-symmetric


def test_overrides_parse_yaml_values():
    r = load_recipe("classify_digits", [
        "optim.lr=0.01", "train.epochs=3", "data.skip_bad_samples=true", "optim.betas=[0.8, 0.95]",
        "data.class_names=[a, b, c]", "model.args={rel_pos: false}", "optim.grad_clip=null",
        "out=runs/x=y", "data.augment.hflip=true",
    ])
    assert r.optim.lr == 0.01 and isinstance(r.optim.lr, float)
    assert r.train.epochs == 3 and isinstance(r.train.epochs, int)
    assert r.data.skip_bad_samples is True
    assert r.optim.betas == (0.8, 0.95)
    assert r.data.class_names == ["a", "b", "c"]
    assert r.model.args == {"rel_pos": False}
    assert r.optim.grad_clip is None
    assert r.out == "runs/x=y"  # only the first '=' splits
    assert r.data.augment["hflip"] is True
    # the rest of the packaged recipe is untouched by the overrides
    assert r.data.augment["affine_degrees"] == 10
    assert r.optim.weight_decay == 0.05 and r.data.img_size == 32


def test_overrides_as_dict():
    r = load_recipe(None, {"optim.lr": 0.5, "data.batch_size": 8})
    assert r.optim.lr == 0.5 and r.data.batch_size == 8


def test_override_without_equals_sign():
    with pytest.raises(RecipeError, match="optim.lr"):
        load_recipe(None, ["optim.lr"])


def test_unknown_top_level_key_names_it_and_lists_fields():
    with pytest.raises(RecipeError) as e:
        load_recipe(None, ["nosuch=1"])
    msg = str(e.value)
    assert "nosuch" in msg
    for name in _names(Recipe):
        assert name in msg


def test_unknown_nested_key_names_it_and_lists_fields():
    with pytest.raises(RecipeError) as e:
        load_recipe(None, ["optim.learning_rate=0.1"])
    msg = str(e.value)
    assert "learning_rate" in msg and "optim" in msg
    for name in _names(OptimCfg):
        assert name in msg


def test_unknown_key_in_yaml_file_names_file_and_key(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("task: classify\ntrain:\n  epoch: 3\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(str(p))
    msg = str(e.value)
    assert str(p) in msg and "epoch" in msg
    for name in _names(TrainCfg):
        assert name in msg


@pytest.mark.parametrize("override", ["out.x=1", "model.name.x=1"])
def test_override_into_a_scalar_field_is_an_error(override):
    # `out` and `model.name` are plain values, not sections: `out.x=1` must not turn `out` into a dict.
    with pytest.raises(RecipeError, match=override.split("=")[0].rsplit(".", 1)[0]):
        load_recipe(None, [override])


@pytest.mark.parametrize("override,field", [
    ("train.precision=fp16", "train.precision"),
    ("train.epochs=0", "train.epochs"),
    ("train.epochs=2.5", "train.epochs"),
    ("optim.lr=-0.1", "optim.lr"),
    ("optim.lr=0", "optim.lr"),
    ("data.batch_size=0", "data.batch_size"),
    ("data.img_size=4", "data.img_size"),
    ("train.device=tpu", "train.device"),
    ("train.ema_decay=1.0", "train.ema_decay"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(RecipeError, match=field.replace(".", r"\.")):
        load_recipe(None, [override])


@pytest.mark.parametrize("override,field", [
    ("train.ema_decay=abc", "train.ema_decay"),  # currently a TypeError from the comparison
    ("train.device=5", "train.device"),  # currently an AttributeError (int has no startswith)
    ("train.epochs=true", "train.epochs"),  # a YAML bool is not an epoch count
])
def test_wrongly_typed_values_are_recipe_errors(override, field):
    with pytest.raises(RecipeError, match=field.replace(".", r"\.")):
        load_recipe(None, [override])


def test_bad_value_in_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  precision: fp16\n")
    with pytest.raises(RecipeError, match=r"train\.precision"):
        load_recipe(str(p))


def test_save_load_round_trip(tmp_path):
    r = load_recipe("classify_digits", ["data.class_names=[zero, one]", "optim.betas=[0.85, 0.99]",
                                        "model.args={rel_pos: false}", "data.limit_train=7",
                                        "train.ema_decay=0.5", "optim.grad_clip=null"])
    path = tmp_path / "config.yaml"
    r.save(path)
    text = path.read_text()
    assert "!!python" not in text  # plain YAML, readable by safe_load
    assert yaml.safe_load(text)["data"]["class_names"] == ["zero", "one"]
    again = load_recipe(str(path))
    assert again == r
    assert again.optim.betas == (0.85, 0.99)


def test_unknown_recipe_name_lists_packaged_recipes():
    with pytest.raises(RecipeError) as e:
        load_recipe("classify_nothing")
    msg = str(e.value)
    assert "classify_nothing" in msg
    for name in ("classify_digits", "classify_imagefolder"):
        assert name in msg


def test_missing_yaml_path(tmp_path):
    p = tmp_path / "missing.yaml"
    with pytest.raises(RecipeError, match="missing.yaml"):
        load_recipe(str(p))


def test_malformed_yaml_names_the_file(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("task: classify\nmodel: {name: [tiny_moat_0\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(str(p))
    assert str(p) in str(e.value)
    assert "\n" not in str(e.value)


def test_yaml_that_is_not_a_mapping_names_the_file(tmp_path):
    p = tmp_path / "list.yaml"
    p.write_text("- task\n- classify\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(str(p))
    assert str(p) in str(e.value)


# --- numbers as people write them ------------------------------------------------------------------

@pytest.mark.parametrize("text, value", [("3e-4", 3e-4), ("1e-5", 1e-5), ("1E-3", 1e-3), ("2e+1", 20.0),
                                         ("0.00001", 1e-5), ('"5e-4"', 5e-4), ("1_0e-2", 0.1), (".5e-1", 0.05)])
def test_numbers_with_an_exponent_are_numbers(text, value):
    # PyYAML (YAML 1.1) reads a mantissa without a dot as text: 1e-5 used to stay the string '1e-5'
    r = load_recipe("classify_digits", [f"optim.lr={text}", f"optim.weight_decay={text}"])
    assert isinstance(r.optim.lr, float) and r.optim.lr == pytest.approx(value, rel=1e-12)
    assert isinstance(r.optim.weight_decay, float) and r.optim.weight_decay == pytest.approx(value, rel=1e-12)


def test_integer_fields_take_integral_numbers_in_any_spelling():
    r = load_recipe("classify_digits", ["train.epochs=1e1", "data.batch_size=32.0", "data.limit_train=1_000"])
    assert (r.train.epochs, r.data.batch_size, r.data.limit_train) == (10, 32, 1000)
    assert all(type(v) is int for v in (r.train.epochs, r.data.batch_size, r.data.limit_train))


def test_a_recipe_file_with_exponents(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("optim:\n  lr: 3e-4\n  weight_decay: 1e-5\n  betas: [0.9, 0.999]\ntrain:\n  epochs: 2\n")
    r = load_recipe(str(path))
    assert r.optim.lr == 3e-4 and r.optim.weight_decay == 1e-5


def test_a_saved_recipe_reads_back_its_small_numbers(tmp_path):
    r = load_recipe("classify_digits", ["optim.lr=1e-5", "optim.weight_decay=3e-7"])
    r.save(tmp_path / "config.yaml")
    again = load_recipe(str(tmp_path / "config.yaml"))
    assert again.optim.lr == 1e-5 and again.optim.weight_decay == 3e-7


@pytest.mark.parametrize("override, field", [
    ("optim.weight_decay=abc", "optim.weight_decay"), ("optim.lr=[1, 2]", "optim.lr"),
    ("train.epochs=2.5", "train.epochs"), ("train.epochs=true", "train.epochs"),
    ("optim.grad_clip=.nan", "optim.grad_clip"), ("data.limit_train=ten", "data.limit_train"),
    ("data.skip_bad_samples=1", "data.skip_bad_samples"), ("model.checkpoint=[a]", "model.checkpoint"),
])
def test_a_value_of_the_wrong_type_names_its_field(override, field):
    with pytest.raises(RecipeError, match=rf"^{field} must be .*got"):
        load_recipe("classify_digits", [override])


def test_task_options_are_typed_after_their_defaults():
    from mobilezoo.tasks import build_task
    task = build_task(load_recipe("detect_shapes", ["data.augment.ssd_crop=1e-1", "data.augment.hflip=1"]))
    assert task.aug == {"hflip": 1.0, "ssd_crop": 0.1} and isinstance(task.aug["hflip"], float)
    video = build_task(load_recipe("video_motion", ["data.augment.clip_len=8.0", "data.augment.scales=[1, 5e-1]"]))
    assert video.opts["clip_len"] == 8 and type(video.opts["clip_len"]) is int and video.opts["scales"] == [1.0, 0.5]
    for override, field in (("data.augment.hflip=yes", "data.augment.hflip"),
                            ("data.augment.scales=0.5", "data.augment.scales"),
                            ("data.augment.crop_pct=[1]", "data.augment.crop_pct")):
        recipe = "classify_digits" if "crop_pct" in override else "detect_shapes" if "hflip" in override \
            else "video_motion"
        with pytest.raises(RecipeError, match=rf"^{field}"):
            build_task(load_recipe(recipe, [override]))
