"""Job spec: paper defaults, YAML/JSON loading, and errors that name the field."""

from __future__ import annotations

import json

import pytest

from opsd_engine.config import JobSpec, SpecError, load_spec, parse_spec, spec_to_dict

MINIMAL = {"base_model": "Qwen/Qwen3-4B", "dataset_uri": "s3://bucket/train.jsonl"}


def test_minimal_spec_gets_paper_defaults() -> None:
    spec = parse_spec(MINIMAL)
    assert spec.method == "opsd"
    assert spec.divergence == "jsd" and spec.beta == 0.5
    assert spec.teacher == "initial"
    assert spec.max_new_tokens == 2048
    assert spec.generation.temperature == 1.2 and spec.generation.num_generations == 1
    assert spec.lora.r == 64 and spec.lora.alpha == 128
    assert spec.lora.target_modules == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    assert spec.optim.learning_rate == 2e-5 and spec.optim.warmup_ratio == 0.1
    assert spec.optim.lr_schedule == "cosine"
    assert spec.loss.temperature == 1.0
    assert spec.loss.num_loss_tokens_to_skip == 0 and spec.loss.clip is None
    assert spec.dataset.problem_field == "problem" and spec.dataset.solution_field == "solution"
    assert "reference solution" in spec.prompts.teacher_template
    assert (
        "please try to solve this problem using your own approach" in spec.prompts.teacher_template
    )


def test_round_trip_through_dict_is_identity() -> None:
    spec = parse_spec({**MINIMAL, "optim": {"max_steps": 5}, "loss": {"clip": 3.0}})
    assert parse_spec(spec_to_dict(spec)) == spec


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"divergence": "kl"}, "divergence"),
        ({"beta": 1.5}, "beta"),
        ({"teacher": "frozen"}, "teacher"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"optim": {"learning_rate": -1e-5}}, "optim.learning_rate"),
        ({"optim": {"batch_size": 0}}, "optim.batch_size"),
        ({"optim": {"max_steps": 3, "epochs": 1}}, "optim"),
        ({"generation": {"top_p": 0}}, "generation.top_p"),
        ({"lora": {"r": 0}}, "lora.r"),
        ({"lora": {"target_modules": []}}, "lora.target_modules"),
        ({"loss": {"temperature": 0}}, "loss.temperature"),
        ({"loss": {"clip": -1}}, "loss.clip"),
        ({"prompts": {"teacher_template": "{problem} only"}}, "prompts.teacher_template"),
        ({"prompts": {"student_template": "{problem} {oops}"}}, "prompts.student_template"),
        ({"lora": {"rank": 8}}, "lora.rank"),
        ({"learning_rate": 1e-5}, "learning_rate"),
        ({"method": "dpo"}, "method"),
        ({"base_model": "  "}, "base_model"),
    ],
)
def test_bad_values_name_the_field(patch: dict, field: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec({**MINIMAL, **patch})
    assert info.value.first_field == field
    assert field in str(info.value)


def test_missing_required_fields_are_named() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec({"base_model": "x"})
    assert [path for path, _ in info.value.errors] == ["dataset_uri"]


def test_yaml_and_json_load_the_same_spec(tmp_path) -> None:
    body = {**MINIMAL, "divergence": "reverse_kl", "optim": {"max_steps": 7, "batch_size": 2}}
    (tmp_path / "a.json").write_text(json.dumps(body))
    (tmp_path / "a.yaml").write_text(
        "base_model: Qwen/Qwen3-4B\ndataset_uri: s3://bucket/train.jsonl\ndivergence: reverse_kl\n"
        "optim:\n  max_steps: 7\n  batch_size: 2\n"
    )
    assert load_spec(tmp_path / "a.json") == load_spec(tmp_path / "a.yaml") == JobSpec(**body)


def test_relative_local_paths_resolve_against_the_spec_file(tmp_path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "data.jsonl").write_text("{}\n")
    (tmp_path / "spec.yaml").write_text("base_model: model\ndataset_uri: data.jsonl\n")
    spec = load_spec(tmp_path / "spec.yaml")
    assert spec.base_model == str((tmp_path / "model").resolve())
    assert spec.dataset_uri == str((tmp_path / "data.jsonl").resolve())


def test_file_errors_name_the_file(tmp_path) -> None:
    with pytest.raises(SpecError, match=r"missing\.yaml"):
        load_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("base_model: [unclosed\n")
    with pytest.raises(SpecError, match=r"(?s)bad\.yaml.*not valid"):
        load_spec(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="expected a mapping"):
        load_spec(listing)


def test_vocab_clip_is_refused_with_the_sampled_token_loss() -> None:
    with pytest.raises(SpecError, match="vocab_clip") as info:
        parse_spec({**MINIMAL, "divergence": "sampled_token", "loss": {"vocab_clip": 0.05}})
    assert info.value.first_field == "loss"
    spec = parse_spec({**MINIMAL, "divergence": "forward_kl", "loss": {"vocab_clip": 0.05}})
    assert spec.loss.vocab_clip == 0.05 and spec.loss.clip is None


def test_official_recipe_sets_its_defaults_and_explicit_fields_win() -> None:
    spec = parse_spec({**MINIMAL, "recipe": "official-2026-04"})
    assert spec.recipe == "official-2026-04"
    assert spec.divergence == "jsd" and spec.beta == 0.0  # forward KL, as their --beta 0
    assert spec.loss.vocab_clip == 0.05 and spec.loss.clip is None
    assert spec.optim.learning_rate == 5e-6 and spec.optim.max_grad_norm == 0.1
    assert spec.max_new_tokens == 1024 and spec.teacher == "initial"
    assert (spec.generation.temperature, spec.generation.top_p, spec.generation.top_k) == (
        1.1,
        0.95,
        20,
    )
    assert spec.prompts.student_thinking is False and spec.prompts.teacher_thinking is False
    assert (spec.lora.r, spec.lora.alpha) == (64, 128)
    # untouched groups keep the built-in defaults
    assert spec.optim.warmup_ratio == 0.1 and spec.optim.grad_accum == 4

    mine = parse_spec(
        {
            **MINIMAL,
            "recipe": "official-2026-04",
            "beta": 0.5,
            "optim": {"learning_rate": 1e-5},
            "loss": {"temperature": 2.0},
        }
    )
    assert mine.beta == 0.5 and mine.optim.learning_rate == 1e-5
    assert mine.optim.max_grad_norm == 0.1  # the rest of the group still from the recipe
    assert mine.loss.temperature == 2.0 and mine.loss.vocab_clip == 0.05
    # the resolved dump re-parses to the same spec (what the service stores and resumes from)
    assert parse_spec(spec_to_dict(mine)) == mine


def test_paper_recipe_is_the_built_in_defaults() -> None:
    paper = parse_spec({**MINIMAL, "recipe": "paper-v1"})
    plain = parse_spec(MINIMAL)
    assert spec_to_dict(paper) == {**spec_to_dict(plain), "recipe": "paper-v1"}


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"recipe": "official"}, "recipe"),
        ({"recipe": "paper-v1", "method": "sft"}, "recipe"),
        ({"recipe": "official-2026-04", "optim": 3}, "optim"),
    ],
)
def test_bad_recipes_name_the_field(patch: dict, field: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec({**MINIMAL, **patch})
    assert info.value.first_field == field


def test_spec_sources_say_who_set_each_value(tmp_path) -> None:
    from opsd_engine.config import load_spec_with_sources

    path = tmp_path / "s.yaml"
    path.write_text(
        "base_model: m\ndataset_uri: s3://b/d.jsonl\nrecipe: official-2026-04\n"
        "optim:\n  learning_rate: 1.0e-5\n"
    )
    spec, sources = load_spec_with_sources(path)
    assert sources["optim.learning_rate"] == (1e-5, "user")
    assert sources["optim.max_grad_norm"] == (0.1, "recipe official-2026-04")
    assert sources["loss.vocab_clip"] == (0.05, "recipe official-2026-04")
    assert sources["optim.warmup_ratio"] == (0.1, "default")
    assert sources["recipe"] == ("official-2026-04", "user")
    assert sources["metadata"] == ({}, "default")
    assert set(sources) >= {"lora.target_modules", "prompts.teacher_thinking"}
    assert spec.optim.learning_rate == 1e-5
