"""Recipes: one schema, precise errors, overrides, and every shipped recipe validates."""

from __future__ import annotations

from pathlib import Path

import pytest

from rltrain.recipes import GRPOSection, Recipe, RecipeError, load_recipe, parse_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_validate(path: Path) -> None:
    assert isinstance(load_recipe(path), Recipe)


def test_unknown_key_names_field_and_suggests(tmp_path: Path) -> None:
    bad = tmp_path / "r.yaml"
    bad.write_text("runner:\n  concurency: 4\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(bad)
    message = str(info.value)
    assert str(bad) in message and "runner.concurency" in message and "did you mean 'concurrency'" in message


def test_wrong_type_names_value() -> None:
    with pytest.raises(RecipeError, match=r"algorithm\.learning_rate: .*got 'fast'"):
        parse_recipe({"algorithm": {"name": "grpo", "learning_rate": "fast"}})


def test_nested_unknown_key_lists_known_keys() -> None:
    with pytest.raises(RecipeError, match=r"algorithm\.lora\.rank: unknown key \(known keys: r, alpha"):
        parse_recipe({"algorithm": {"name": "grpo", "lora": {"rank": 8}}})


def test_overrides_are_validated_too() -> None:
    recipe = parse_recipe({}, overrides=["runner.concurrency=3", "algorithm={name: grpo, max_steps: 2}"])
    assert recipe.runner.concurrency == 3
    assert isinstance(recipe.algorithm, GRPOSection) and recipe.algorithm.max_steps == 2
    with pytest.raises(RecipeError, match="runner.concurrency"):
        parse_recipe({}, overrides=["runner.concurrency=0"])
    with pytest.raises(RecipeError, match="must look like"):
        parse_recipe({}, overrides=["runner.concurrency"])


def test_not_a_mapping_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="must be a mapping"):
        parse_recipe([1, 2])
    broken = tmp_path / "b.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(broken)
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_run_name_must_be_a_folder_name() -> None:
    with pytest.raises(RecipeError, match="name"):
        parse_recipe({"name": "../escape"})


@pytest.mark.parametrize("field", ["train", "val", "extra_eval"])
def test_selection_set_must_be_a_set_of_its_own(field: str) -> None:
    data = {"train": "generated:n=50,seed=1", "val": "public:val", "extra_eval": ["generated:n=40,seed=99"]}
    data["select"] = data[field][0] if field == "extra_eval" else data[field]
    with pytest.raises(RecipeError, match=r"select .* is also a training or reported set"):
        parse_recipe({"data": data})
    data["select"] = "generated:n=40,seed=13"
    assert parse_recipe({"data": data}).data.select == "generated:n=40,seed=13"
