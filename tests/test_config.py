import pytest

from clicktrain_deploy.config import load_recipe, parse_recipe
from clicktrain_deploy.errors import RecipeError


@pytest.mark.parametrize("raw,message", [
    ({"pruning": {"connectivity_ratio": 1.5}}, "pruning.connectivity_ratio: Input should be less than 1"),
    ({"pruning": {"conectivity_ratio": 0.5}}, "pruning.conectivity_ratio: Extra inputs are not permitted"),
    ({"model": {"name": "resnet21"}}, "model: unknown model 'resnet21'"),
    ({"data": {"name": "mnist"}}, "data: unknown dataset 'mnist'"),
    ({"data": {"name": "image_folder"}}, "data.root is required"),
    ({"pruning": {"patterns": "clicktrain5"}}, "pruning.patterns: unknown pattern library"),
    ({"pruning": {"block_size": 0}}, "pruning.block_size"),
    ({"pruning": {"layer_ratios": {"layers.*": 1.2}}}, "ratio for 'layers.*' must be in"),
    ({"schedule": {"epochs": 3}, "pruning": {"select_epoch": 3}}, "pruning.select_epoch (3) must be < schedule.epochs (3)"),
    ({"schedule": {"epochs": 5}, "pruning": {"select_epoch": 3, "hard_prune_epoch": 2}}, "pruning.hard_prune_epoch (2)"),
    ({"schedule": {"lr_schedule": "linear"}}, "schedule.lr_schedule"),
    ({"deploy": {"targets": ["x86", "riscv"]}}, "deploy.targets: unknown target 'riscv'; known: arm64, cortex-a72"),
    ({"deploy": {"targets": []}}, "deploy.targets: List should have at least 1 item"),
    ({"deploy": {"bench_threads": [1, 0]}}, "deploy.bench_threads: thread counts must be >= 1"),
    ({"deploy": {"atol": -1}}, "deploy.atol: Input should be greater than or equal to 0"),
])
def test_bad_fields_are_named(raw, message):
    with pytest.raises(RecipeError) as info:
        parse_recipe(raw, "r.toml")
    assert message in str(info.value)
    assert str(info.value).startswith("r.toml: ")


def test_dense_recipe_ignores_pruning_epochs():
    # the same epochs stop a pruning recipe: what lets the dense one through is its method
    for method in ("clicktrain", "admm"):
        with pytest.raises(RecipeError, match=r"pruning.select_epoch \(9\) must be < schedule.epochs \(2\)"):
            parse_recipe({"schedule": {"epochs": 2}, "pruning": {"method": method, "select_epoch": 9}})
    recipe = parse_recipe({"schedule": {"epochs": 2}, "pruning": {"method": "dense", "select_epoch": 9}})
    from clicktrain_deploy.pruning import create_method
    from clicktrain_deploy.models import create_model

    method = create_method(create_model("resnet20", 10, 1), recipe.pruning)
    assert [method.phase(epoch) for epoch in range(2)] == ["dense", "dense"]


def test_toml_and_yaml_load_the_same_recipe(tmp_path):
    (tmp_path / "r.toml").write_text('output_dir = "out"\n[pruning]\nblock_size = 4\n')
    (tmp_path / "r.yaml").write_text("output_dir: out\npruning:\n  block_size: 4\n")
    a, b = load_recipe(tmp_path / "r.toml"), load_recipe(tmp_path / "r.yaml")
    assert a == b and a.output_dir == str(tmp_path / "out")


def test_unreadable_recipes_name_the_file(tmp_path):
    with pytest.raises(RecipeError, match="missing.toml: recipe file not found"):
        load_recipe(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[pruning\n")
    with pytest.raises(RecipeError, match="bad.toml: not valid TOML"):
        load_recipe(bad)
    (tmp_path / "r.json").write_text("{}")
    with pytest.raises(RecipeError, match="must be .toml, .yaml or .yml"):
        load_recipe(tmp_path / "r.json")


def test_shipped_recipes_are_valid():
    from pathlib import Path
    for path in (Path(__file__).parents[1] / "recipes").glob("*.toml"):
        load_recipe(path)
