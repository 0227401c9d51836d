"""Real dataset layouts (issue #10, faults 5 and 6): dotted paths, chat-message prompts, TRL's
conversational and prompt-completion layouts, verl's parquet layout, and named fields that rows
lack. Each layout is written the way its tool writes it (cited per test) and read with at most
field names, as a user would put them in the spec's ``dataset`` group."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from opsd_engine.data import DatasetError, Example, load_examples, lookup_field


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def error_of(fn: Any, *args: Any, **kwargs: Any) -> DatasetError:
    with pytest.raises(DatasetError) as info:
        fn(*args, **kwargs)
    return info.value


# --------------------------------------------------------------------------- fault 5


def test_answer_field_no_row_has_is_an_error_naming_field_file_and_row(tmp_path: Path) -> None:
    rows = [
        {"problem": "1+1?", "solution": r"\boxed{2}", "final_answer": "2"},
        {"problem": "2+2?", "solution": r"\boxed{4}", "final_answer": "4"},
    ]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    error = error_of(load_examples, str(path), answer_field="final_answr")  # the typo
    assert (error.field, error.uri, error.line) == ("final_answr", str(path), 1)
    message = str(error)
    assert "no row has this field (checked 2 rows)" in message
    assert "'final_answer'" in message  # the row's fields, and the likely intended column
    assert "pass answer_field='final_answer'" in message


def test_named_field_missing_from_some_rows_names_the_first_such_row(tmp_path: Path) -> None:
    rows = [
        {"problem": "a", "solution": "s", "gold": "1"},
        {"problem": "b", "solution": "s"},
        {"problem": "c", "solution": "s", "gold": "3"},
        {"problem": "d", "solution": "s"},
    ]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    error = error_of(load_examples, str(path), answer_field="gold")
    assert (error.field, error.line) == ("gold", 2)
    assert "the first of 2 of 4 rows without it" in str(error)
    # a null value is present (no answer for that row), not missing
    rows[1]["gold"] = rows[3]["gold"] = None
    write_jsonl(path, rows)
    answers = [e.answer for e in load_examples(str(path), answer_field="gold")]
    assert answers == ["1", None, "3", None]


def test_named_solution_field_of_an_eval_set_must_exist(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bench.jsonl", [{"problem": "p", "answer": "1"}])
    error = error_of(load_examples, str(path), solution_field="worked", require_solution=False)
    assert error.field == "worked" and "no row has this field" in str(error)


def test_default_answer_name_may_be_absent_and_limit_bounds_the_check(tmp_path: Path) -> None:
    rows = [{"problem": "p", "solution": "s"}, {"problem": "q", "solution": "t", "ans": "1"}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    assert [e.answer for e in load_examples(str(path))] == [None, None]  # default "answer"
    with pytest.raises(DatasetError, match="the first of 1 of 2 rows without it"):
        load_examples(str(path), answer_field="ans")
    with pytest.raises(DatasetError, match=r"no row has this field \(checked 1 rows\)"):
        load_examples(str(path), answer_field="ans", limit=1)  # only row 1 was read


# --------------------------------------------------------------------------- dotted paths


def test_lookup_field_dotted_paths_lists_and_literal_keys() -> None:
    row = {"a.b": "literal", "a": {"b": "nested", "c": [{"d": 5}]}, "m": None}
    assert lookup_field(row, "a.b") == "literal"  # a column named with a dot wins
    assert lookup_field(row, "a.c.0.d") == 5
    missing = lookup_field(row, "x")
    for path in ("a.x", "a.c.1.d", "a.c.d", "m.n", "a.b.c"):
        assert lookup_field(row, path) is missing, path
    assert lookup_field(row, "m") is None


def test_nested_fields_missing_in_a_later_row(tmp_path: Path) -> None:
    rows = [
        {"q": {"text": "1+1?"}, "sol": "s", "meta": {"gt": 2}},
        {"q": {"text": "2+2?"}, "sol": "s", "meta": {}},
    ]
    path = write_jsonl(tmp_path / "nested.jsonl", rows)
    error = error_of(
        load_examples, str(path), problem_field="q.text", solution_field="sol",
        answer_field="meta.gt",
    )  # fmt: skip
    assert (error.field, error.line) == ("meta.gt", 2)
    rows[1]["meta"]["gt"] = 4
    write_jsonl(path, rows)
    loaded = load_examples(
        str(path), problem_field="q.text", solution_field="sol", answer_field="meta.gt"
    )
    assert [(e.problem, e.answer) for e in loaded] == [("1+1?", "2"), ("2+2?", "4")]
    assert loaded[0].extra == {}  # q, sol and meta were used


# --------------------------------------------------------------------------- chat messages


def test_chat_message_problem_uses_last_user_message_and_system(tmp_path: Path) -> None:
    messages = [
        {"role": "system", "content": "You are a careful solver."},
        {"role": "user", "content": "Example: 1+1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": [{"type": "text", "text": "Now: 2+3?"}, {"type": "text",
                                                                            "text": "Box it."}]},
    ]  # fmt: skip
    path = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": messages, "solution": "5"}])
    (example,) = load_examples(str(path), problem_field="prompt")
    assert example.problem == "Now: 2+3?\nBox it."  # text parts joined by newlines, as vLLM does
    assert example.system_prompt == "You are a careful solver."
    assert example.solution == "5"


@pytest.mark.parametrize(
    ("messages", "fragment"),
    [
        ([{"role": "system", "content": "s"}], "chat messages have no 'user' message"),
        ([{"role": "user", "content": ""}], "the last 'user' message is empty"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "is empty"),
    ],
)
def test_chat_messages_without_a_usable_user_message(
    tmp_path: Path, messages: list[dict[str, Any]], fragment: str
) -> None:
    rows = [{"prompt": [{"role": "user", "content": "ok"}], "solution": "s"}]
    rows.append({"prompt": messages, "solution": "s"})
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    error = error_of(load_examples, str(path), problem_field="prompt")
    assert (error.field, error.line) == ("prompt", 2) and fragment in str(error)


def test_answer_as_chat_messages_is_refused(tmp_path: Path) -> None:
    row = {"problem": "p", "solution": "s", "answer": [{"role": "assistant", "content": "1"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    error = error_of(load_examples, str(path))
    assert error.field == "answer" and "expected a string or a number" in str(error)


def test_trl_conversational_layout(tmp_path: Path) -> None:
    # TRL "conversational language modeling" rows: {"messages": [system?, user, assistant]}
    # (https://huggingface.co/docs/trl/dataset_formats#conversational)
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Solve it."},
                {"role": "user", "content": "What is 3*4?"},
                {"role": "assistant", "content": r"3*4=12, so \boxed{12}."},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "What is 5-2?"},
                {"role": "assistant", "content": r"\boxed{3}"},
            ]
        },
    ]
    path = write_jsonl(tmp_path / "conversational.jsonl", rows)
    loaded = load_examples(str(path), problem_field="messages", solution_field="messages")
    assert loaded == [
        Example("What is 3*4?", r"3*4=12, so \boxed{12}.", None, 0, {}, "Solve it."),
        Example("What is 5-2?", r"\boxed{3}", None, 1, {}, None),
    ]


def test_trl_prompt_completion_layouts(tmp_path: Path) -> None:
    # TRL "prompt-completion": standard (strings) and conversational (message lists)
    # (https://huggingface.co/docs/trl/dataset_formats#prompt-completion)
    standard = write_jsonl(
        tmp_path / "standard.jsonl", [{"prompt": "What is 2+2?", "completion": r"\boxed{4}"}]
    )
    conversational = write_jsonl(
        tmp_path / "conversational.jsonl",
        [
            {
                "prompt": [{"role": "user", "content": "What is 2+2?"}],
                "completion": [{"role": "assistant", "content": r"\boxed{4}"}],
            }
        ],
    )
    for path in (standard, conversational):
        (example,) = load_examples(str(path), problem_field="prompt", solution_field="completion")
        assert (example.problem, example.solution) == ("What is 2+2?", r"\boxed{4}")


def write_verl_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    """A parquet file laid out like verl's data preprocessing scripts write it
    (verl ``examples/data_preprocess/gsm8k.py``: ``data_source``, ``prompt`` as a list of chat
    messages, ``ability``, ``reward_model: {style, ground_truth}``, ``extra_info: {split,
    index, answer, question}``), with pyarrow's nested list/struct types."""
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, path)
    return path


def verl_row(index: int, question: str, solution: str, answer: str) -> dict[str, Any]:
    return {
        "data_source": "openai/gsm8k",
        "prompt": [
            {
                "role": "user",
                "content": question + " Let's think step by step and output the final answer "
                'after "####".',
            }
        ],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": answer},
        "extra_info": {"split": "train", "index": index, "answer": solution, "question": question},
    }


def test_verl_parquet_layout(tmp_path: Path) -> None:
    rows = [
        verl_row(0, "Ann has 3 pens and buys 4. How many?", "3+4=7 #### 7", "7"),
        verl_row(1, "Tom has 9 eggs and eats 2. How many?", "9-2=7 #### 7", "7"),
    ]
    path = write_verl_parquet(tmp_path / "train.parquet", rows)
    loaded = load_examples(
        str(path),
        problem_field="prompt",
        solution_field="extra_info.answer",
        answer_field="reward_model.ground_truth",
    )
    assert [(e.problem.split(" Let's")[0], e.solution, e.answer) for e in loaded] == [
        ("Ann has 3 pens and buys 4. How many?", "3+4=7 #### 7", "7"),
        ("Tom has 9 eggs and eats 2. How many?", "9-2=7 #### 7", "7"),
    ]
    assert loaded[0].extra == {"data_source": "openai/gsm8k", "ability": "math"}
    # as an eval set: no solution needed, the answer from the nested field
    bench = load_examples(
        str(path),
        problem_field="prompt",
        answer_field="reward_model.ground_truth",
        require_solution=False,
    )
    assert [e.answer for e in bench] == ["7", "7"]
    # a typo in the nested path is caught like a flat one
    error = error_of(
        load_examples, str(path), problem_field="prompt", solution_field="extra_info.answer",
        answer_field="reward_model.groundtruth",
    )  # fmt: skip
    assert error.field == "reward_model.groundtruth" and error.row == 0


# --------------------------------------------------------------------------- README


def readme_layouts() -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """The ``### Dataset layouts`` examples of the README: (dataset group, rows) per block."""
    import re

    import yaml

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Dataset layouts", 1)[1].split("\n## ", 1)[0]
    layouts, rest = [], section
    while "```jsonl\n" in rest:
        before, rest = rest.split("```jsonl\n", 1)
        block, rest = rest.split("```", 1)
        spec = re.search(r"`dataset: (\{[^`]*\})`", before, flags=re.S)
        fields = yaml.safe_load(spec.group(1).replace("\n", " ")) if spec else {}
        layouts.append((fields, [json.loads(line) for line in block.splitlines()]))
    return layouts


def test_readme_layout_examples_load_with_their_field_names(tmp_path: Path) -> None:
    layouts = readme_layouts()
    assert len(layouts) == 4
    for number, (fields, rows) in enumerate(layouts):
        assert len(rows) == 3  # each layout is documented with a 3-line example file
        jsonl = write_jsonl(tmp_path / f"layout{number}.jsonl", rows)
        examples = load_examples(str(jsonl), **fields)
        assert [e.problem for e in examples] and all(e.problem and e.solution for e in examples)
        assert all("\\boxed" in e.solution or "####" in e.solution for e in examples)
        if "answer_field" in fields:  # verl: the same rows as parquet read the same way
            parquet = write_verl_parquet(tmp_path / f"layout{number}.parquet", rows)
            assert load_examples(str(parquet), **fields) == examples
            assert [e.answer for e in examples] == ["7", "7", "10"]
    conversational = load_examples(str(tmp_path / "layout1.jsonl"), **layouts[1][0])
    assert conversational[0].system_prompt == "Solve step by step."
    assert conversational[0].problem == "What is 2 + 3?"
