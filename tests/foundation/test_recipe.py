"""Recipe validation and parameter resolution (filters and layer gradients)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergekit_ext.errors import RecipeError
from mergekit_ext.recipe import layer_index, layer_position, load_recipe, parse_recipe, resolve_value


def test_gradient_interpolates_over_layers() -> None:
    # s = t(n-1): t = 0.5 over [0, 1, 4] sits on the middle value; t = 0.75 halfway to the last.
    assert resolve_value([0.0, 1.0, 4.0], "x", 0.5) == pytest.approx(1.0)
    assert resolve_value([0.0, 1.0, 4.0], "x", 0.75) == pytest.approx(2.5)
    assert resolve_value([0.0, 1.0, 4.0], "x", 1.0) == pytest.approx(4.0)


def test_first_matching_filter_wins() -> None:
    value = [{"filter": "mlp", "value": 0.7}, {"filter": "up_proj", "value": 0.1}, {"value": 0.3}]
    assert resolve_value(value, "model.layers.0.mlp.up_proj.weight", 0.0) == pytest.approx(0.7)
    assert resolve_value(value, "model.layers.0.self_attn.q_proj.weight", 0.0) == pytest.approx(0.3)


def test_filter_without_default_gives_none() -> None:
    assert resolve_value([{"filter": "mlp", "value": 0.7}], "model.norm.weight", 0.0) is None


def test_filter_value_may_be_a_gradient() -> None:
    value = [{"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.5}]
    assert resolve_value(value, "model.layers.1.mlp.up_proj.weight", 0.25) == pytest.approx(0.25)


def test_booleans_become_numbers() -> None:
    assert resolve_value(True, "x", 0.0) == 1.0
    assert resolve_value(False, "x", 0.0) == 0.0


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("model.layers.12.mlp.up_proj.weight", 12),
        ("h.3.attn.c_attn.weight", 3),
        ("encoder.layer.5.output.dense.weight", 5),
        ("visual.transformer.resblocks.7.mlp.c_fc.weight", 7),
        ("model.embed_tokens.weight", None),
        ("lm_head.weight", None),
    ],
)
def test_layer_index_from_names(name: str, expected: int | None) -> None:
    assert layer_index(name) == expected


def test_layer_position_rules() -> None:
    assert layer_position("model.layers.3.mlp.up_proj.weight", 4) == pytest.approx(1.0)
    assert layer_position("model.layers.0.mlp.up_proj.weight", 4) == 0.0
    assert layer_position("lm_head.weight", 4) == 0.0
    assert layer_position("model.layers.0.mlp.up_proj.weight", 1) == 1.0


def test_resolution_matches_mergekit_evaluate_setting() -> None:
    config = pytest.importorskip("mergekit.config", reason="mergekit 0.1.5 (the peer extra) is not installed")
    from mergekit.config import ConditionalParameter

    settings = [
        [0.1, 0.5, 0.2, 0.9],
        [{"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.25}],
        0.4,
    ]
    names = ["model.layers.2.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight"]
    for setting in settings:
        theirs_setting = (
            [ConditionalParameter(**item) for item in setting]
            if isinstance(setting, list) and isinstance(setting[0], dict)
            else setting
        )
        for name in names:
            for t in (0.0, 0.3, 0.5, 0.8, 1.0):
                expected = config.evaluate_setting(name, theirs_setting, t, validate=float)
                assert resolve_value(setting, name, t) == pytest.approx(expected), (setting, name, t)


def test_validation_error_names_the_key() -> None:
    with pytest.raises(RecipeError, match="missing key 'models.0.model'"):
        parse_recipe({"merge_method": "ties", "models": [{"parameters": {}}]})


def test_unknown_top_level_key() -> None:
    with pytest.raises(RecipeError, match="'merge_methd'"):
        parse_recipe({"merge_methd": "ties"})


def test_slices_are_refused_with_advice() -> None:
    with pytest.raises(RecipeError, match="slices"):
        parse_recipe({"merge_method": "slerp", "slices": []})


def test_load_recipe_errors(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: [unclosed")
    with pytest.raises(RecipeError, match="invalid YAML"):
        load_recipe(bad)


def test_base_listed_in_models_is_not_merged_twice() -> None:
    recipe = parse_recipe(
        {"merge_method": "ties", "base_model": "b", "models": [{"model": "b"}, {"model": "m1"}, {"model": "m2"}]}
    )
    assert recipe.model_paths() == ["m1", "m2"]


def test_method_name_spellings() -> None:
    assert parse_recipe({"merge_method": "Task-Arithmetic"}).merge_method == "task_arithmetic"
