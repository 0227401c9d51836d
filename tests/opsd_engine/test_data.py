"""Tests for opsd_engine.data: every supported source round-trips, every error is readable."""

from __future__ import annotations

import csv
import gzip
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from opsd_engine.data import DatasetError, Example, check_uri_scheme, load_examples

ROWS: list[dict[str, Any]] = [
    {"problem": "What is 2+2?", "solution": "2+2=4", "answer": "4", "source": "gsm"},
    {"problem": "Solve x+1=3.", "solution": "x=3-1=2", "answer": "2", "source": "algebra"},
    {"problem": "Name a prime > 10.", "solution": "11 is prime", "answer": "11", "source": "nt"},
]
EXPECTED = [
    Example(
        problem=r["problem"],
        solution=r["solution"],
        answer=r["answer"],
        index=i,
        extra={"source": r["source"]},
    )
    for i, r in enumerate(ROWS)
]


@pytest.fixture(autouse=True)
def _quiet_datasets() -> Iterator[None]:
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


@pytest.fixture
def memfs() -> Iterator[tuple[Any, str]]:
    """Real fsspec in-memory filesystem, with a unique root removed afterwards."""
    fs = fsspec.filesystem("memory")
    root = f"/opsd-test-{uuid.uuid4().hex}"
    yield fs, root
    if fs.exists(root):
        fs.rm(root, recursive=True)


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def raises(match_all: list[str], fn: Any, *args: Any, **kwargs: Any) -> DatasetError:
    """Assert ``fn`` raises DatasetError whose message contains every string in match_all."""
    with pytest.raises(DatasetError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    for fragment in match_all:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return info.value


# --------------------------------------------------------------------------- round trips


def test_jsonl(tmp_path: Path) -> None:
    assert load_examples(str(write_jsonl(tmp_path / "d.jsonl", ROWS))) == EXPECTED


def test_jsonl_gz(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in ROWS)
    assert load_examples(str(path)) == EXPECTED


@pytest.mark.parametrize("wrap", [None, "data", "examples"])
def test_json_list_or_single_list_object(tmp_path: Path, wrap: str | None) -> None:
    payload: Any = ROWS if wrap is None else {wrap: ROWS, "version": 2}
    path = tmp_path / "d.json"
    path.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    assert load_examples(str(path)) == EXPECTED


def test_parquet(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert load_examples(str(path)) == EXPECTED


def test_csv(tmp_path: Path) -> None:
    assert load_examples(str(write_csv(tmp_path / "d.csv", ROWS))) == EXPECTED


def test_csv_multiline_cells_and_bom(tmp_path: Path) -> None:
    rows = [{**ROWS[0], "solution": "step 1\nstep 2"}, ROWS[1]]
    path = write_csv(tmp_path / "d.csv", rows)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # Excel-style BOM
    examples = load_examples(str(path))
    assert [e.solution for e in examples] == ["step 1\nstep 2", ROWS[1]["solution"]]


def test_save_to_disk_dataset(tmp_path: Path) -> None:
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    assert load_examples(str(tmp_path / "ds")) == EXPECTED


def test_save_to_disk_dataset_dict_uses_train(tmp_path: Path) -> None:
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(ROWS),
            "test": datasets.Dataset.from_list(ROWS[:1]),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_examples(str(tmp_path / "dd")) == EXPECTED
    assert load_examples(f"{tmp_path / 'dd'}#test") == EXPECTED[:1]


def test_save_to_disk_dataset_dict_without_train_names_splits(tmp_path: Path) -> None:
    dd = datasets.DatasetDict(
        {
            "validation": datasets.Dataset.from_list(ROWS),
            "test": datasets.Dataset.from_list(ROWS[:1]),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    raises(
        ["dd", "no 'train' split", "validation", "test", "#<split>"],
        load_examples,
        str(tmp_path / "dd"),
    )
    raises(["split 'dev' not found", "validation, test"], load_examples, f"{tmp_path / 'dd'}#dev")
    assert load_examples(f"{tmp_path / 'dd'}#validation") == EXPECTED


def test_split_on_single_dataset_or_file_is_an_error(tmp_path: Path) -> None:
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    raises(["single Dataset", "'train'"], load_examples, f"{tmp_path / 'ds'}#train")
    write_jsonl(tmp_path / "d.jsonl", ROWS)
    raises(
        ["only save_to_disk directories have splits"],
        load_examples,
        f"{tmp_path / 'd.jsonl'}#train",
    )


def test_hash_in_file_name_is_not_a_split(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data#1.jsonl", ROWS)
    assert load_examples(str(path)) == EXPECTED


def test_memory_filesystem_jsonl_and_parquet(memfs: tuple[Any, str]) -> None:
    fs, root = memfs
    with fs.open(f"{root}/d.jsonl", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in ROWS))
    with fs.open(f"{root}/d.parquet", "wb") as f:
        pq.write_table(pa.Table.from_pylist(ROWS), f)
    assert load_examples(f"memory://{root}/d.jsonl") == EXPECTED
    assert load_examples(f"memory://{root}/d.parquet") == EXPECTED


def test_memory_filesystem_save_to_disk_dict(memfs: tuple[Any, str]) -> None:
    _, root = memfs
    datasets.DatasetDict({"test": datasets.Dataset.from_list(ROWS)}).save_to_disk(
        f"memory://{root}/dd"
    )
    assert load_examples(f"memory://{root}/dd#test") == EXPECTED


def test_file_uri(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    assert load_examples(path.as_uri()) == EXPECTED


def test_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "d.jsonl", ROWS)
    monkeypatch.chdir(tmp_path)
    assert load_examples("sub/d.jsonl") == EXPECTED
    assert load_examples("./sub/../sub/d.jsonl") == EXPECTED


def test_home_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    write_jsonl(tmp_path / "d.jsonl", ROWS)
    assert load_examples("~/d.jsonl") == EXPECTED


def test_directory_of_shards_in_sorted_order(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    write_jsonl(shards / "part-001.jsonl", ROWS[1:2])
    write_jsonl(shards / "part-000.jsonl", ROWS[:1])
    with gzip.open(shards / "part-002.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps(ROWS[2]) + "\n")
    (shards / "_SUCCESS").write_text("")
    (shards / "README.md").write_text("not data")
    assert load_examples(str(shards)) == EXPECTED
    assert load_examples(str(shards), limit=2) == EXPECTED[:2]


def test_directory_of_parquet_shards_on_memory_fs(memfs: tuple[Any, str]) -> None:
    fs, root = memfs
    for i, row in enumerate(ROWS):
        with fs.open(f"{root}/shards/{i:05d}.parquet", "wb") as f:
            pq.write_table(pa.Table.from_pylist([row]), f)
    assert load_examples(f"memory://{root}/shards") == EXPECTED


def test_directory_mixing_formats_is_an_error(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", ROWS)
    (tmp_path / "meta.json").write_text("{}")
    raises(
        [str(tmp_path), "mixes file formats", "a.jsonl", "meta.json"], load_examples, str(tmp_path)
    )


def test_shard_errors_name_the_shard(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    write_jsonl(shards / "a.jsonl", ROWS[:1])
    (shards / "b.jsonl").write_text('{"problem": "x", "solution": "y"}\n{oops\n')
    raises(["b.jsonl", "line 2", "malformed JSON"], load_examples, str(shards))


def test_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    raises(["empty", "no data files", ".jsonl", ".parquet"], load_examples, str(tmp_path / "empty"))


# --------------------------------------------------------------------------- field mapping


def test_custom_field_names_and_extra(tmp_path: Path) -> None:
    rows = [
        {"question": "Q1", "reasoning": "R1", "final": 7, "meta": {"k": 1}},
        {"question": "Q2", "reasoning": "R2", "final": 2.5, "meta": None},
    ]
    examples = load_examples(
        str(write_jsonl(tmp_path / "d.jsonl", rows)),
        problem_field="question",
        solution_field="reasoning",
        answer_field="final",
    )
    assert examples == [
        Example("Q1", "R1", "7", 0, {"meta": {"k": 1}}),
        Example("Q2", "R2", "2.5", 1, {"meta": None}),
    ]


def test_numbers_in_answer_are_converted(tmp_path: Path) -> None:
    rows = [{**ROWS[0], "answer": 4}, {**ROWS[1], "answer": -2.5}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    assert [e.answer for e in load_examples(str(path))] == ["4", "-2.5"]
    pq.write_table(pa.Table.from_pylist(rows[:1]), tmp_path / "d.parquet")
    assert load_examples(str(tmp_path / "d.parquet"))[0].answer == "4"


def test_answer_missing_null_or_empty_is_none(tmp_path: Path) -> None:
    rows = [
        {"problem": "a", "solution": "b"},
        {"problem": "a", "solution": "b", "answer": None},
        {"problem": "a", "solution": "b", "answer": ""},
    ]
    assert [e.answer for e in load_examples(str(write_jsonl(tmp_path / "d.jsonl", rows)))] == [
        None,
        None,
        None,
    ]
    assert load_examples(str(tmp_path / "d.jsonl"), answer_field=None)[0].answer is None


def test_eval_set_without_solution(tmp_path: Path) -> None:
    rows = [{"problem": "a", "answer": "1"}, {"problem": "b", "solution": None}]
    path = str(write_jsonl(tmp_path / "d.jsonl", rows))
    examples = load_examples(path, require_solution=False)
    assert [(e.problem, e.solution) for e in examples] == [("a", None), ("b", None)]
    assert load_examples(path, solution_field=None, require_solution=False)[1].extra == {
        "solution": None
    }


def test_require_solution_without_solution_field_is_an_error(tmp_path: Path) -> None:
    path = str(write_jsonl(tmp_path / "d.jsonl", ROWS))
    raises(
        ["require_solution=True", "solution_field is None"],
        load_examples,
        path,
        solution_field=None,
    )


def test_blank_lines_are_skipped_and_indices_count_rows(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(
        "\n"
        + json.dumps(ROWS[0])
        + "\n   \n\r\n"
        + json.dumps(ROWS[1])
        + "\r\n\n"
        + json.dumps(ROWS[2]),  # no trailing newline
        encoding="utf-8",
    )
    assert load_examples(str(path)) == EXPECTED


def test_limit_stops_early(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    # Line 3 is malformed: with limit=2 it must never be parsed.
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n{not json\n")
    assert load_examples(str(path), limit=2) == EXPECTED[:2]
    assert load_examples(str(write_csv(tmp_path / "d.csv", ROWS)), limit=1) == EXPECTED[:1]
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    assert load_examples(str(tmp_path / "d.parquet"), limit=2) == EXPECTED[:2]
    assert load_examples(str(tmp_path / "d.parquet"), limit=100) == EXPECTED
    with pytest.raises(ValueError, match="limit"):
        load_examples(str(path), limit=0)


# --------------------------------------------------------------------------- errors


def test_file_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    err = raises([str(missing), "not found"], load_examples, str(missing))
    assert err.uri == str(missing)
    raises(["memory://nowhere/x.jsonl", "not found"], load_examples, "memory://nowhere/x.jsonl")


def test_relative_missing_path_shows_resolved_path(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.chdir(tmp_path)
    raises(
        ["rel/x.jsonl", str(tmp_path / "rel" / "x.jsonl"), "not found"],
        load_examples,
        "rel/x.jsonl",
    )


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("e.jsonl", ""),
        ("e.jsonl", "\n\n  \n"),
        ("e.json", ""),
        ("e.json", "[]"),
        ("e.json", '{"data": []}'),
        ("e.csv", ""),
        ("e.csv", "problem,solution\n"),
    ],
)
def test_empty_sources(tmp_path: Path, name: str, content: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    err = raises([str(path)], load_examples, str(path))
    assert "no rows" in str(err) or "empty" in str(err)


def test_empty_parquet(tmp_path: Path) -> None:
    path = tmp_path / "e.parquet"
    pq.write_table(pa.table({"problem": pa.array([], pa.string())}), path)
    raises([str(path), "no rows"], load_examples, str(path))


def test_malformed_json_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + '{"problem": "x", solution: 1}\n')
    err = raises([str(path), "line 3", "malformed JSON", "property name"], load_examples, str(path))
    assert err.line == 3


def test_malformed_json_file(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text('[\n  {"problem": "x"},\n  {"problem": }\n]')
    raises([str(path), "line 3", "malformed JSON"], load_examples, str(path))


def test_json_object_without_single_list(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"train": ROWS, "test": ROWS}))
    raises([str(path), "exactly one list", "'train'", "'test'"], load_examples, str(path))
    path.write_text(json.dumps("just a string"))
    raises([str(path), "got str"], load_examples, str(path))


def test_row_not_an_object(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], ["a", "list"]])
    err = raises([str(path), "line 2", "object", "got JSON list"], load_examples, str(path))
    assert err.line == 2
    json_path = tmp_path / "d.json"
    json_path.write_text(json.dumps([ROWS[0], ROWS[1], 42]))
    err = raises([str(json_path), "row index 2", "got int"], load_examples, str(json_path))
    assert err.row == 2 and err.line is None


def test_missing_required_field_names_field_line_and_present_fields(tmp_path: Path) -> None:
    rows = [ROWS[0], {"question": "Q", "solution": "S", "answer": "1"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    err = raises(
        [
            str(path),
            "line 2",
            "field 'problem'",
            "missing",
            "'question'",
            "'solution'",
            "problem_field='question'",
        ],
        load_examples,
        str(path),
    )
    assert (err.line, err.field, err.uri) == (2, "problem", str(path))


def test_missing_solution_in_csv_and_parquet(tmp_path: Path) -> None:
    rows = [{"problem": "P", "rationale": "R"}]
    csv_path = write_csv(tmp_path / "d.csv", rows)
    raises(
        [str(csv_path), "line 2", "field 'solution'", "'rationale'", "solution_field='rationale'"],
        load_examples,
        str(csv_path),
    )
    pq_path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([ROWS[0], *rows]), pq_path)
    # Parquet has a schema: the column exists but is null on row 1.
    raises([str(pq_path), "row index 1", "field 'solution'", "null"], load_examples, str(pq_path))


def test_csv_line_numbers_account_for_multiline_cells(tmp_path: Path) -> None:
    rows = [
        {"problem": "P1", "solution": "line a\nline b\nline c"},
        {"problem": "", "solution": "S2"},
    ]
    path = write_csv(tmp_path / "d.csv", rows)
    # header = line 1, first record spans lines 2-4, second record starts on line 5.
    raises([str(path), "line 5", "field 'problem'", "empty"], load_examples, str(path))


def test_csv_bad_quoting(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text('problem,solution\nP,S\n"P2"x,S2\n')
    raises([str(path), "line 3", "malformed CSV"], load_examples, str(path))
    path.write_text('problem,solution\nP,S\n"P2,S2\nP3,S3\n')
    raises([str(path), "malformed CSV"], load_examples, str(path))


def test_csv_row_with_too_many_values(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("problem,solution\nP,S\nP,S,extra\n")
    raises([str(path), "line 3", "3 values", "2 columns"], load_examples, str(path))


@pytest.mark.parametrize(
    ("row", "fragment"),
    [
        ({"problem": None, "solution": "s"}, "field 'problem': required field is null"),
        ({"problem": "  ", "solution": "s"}, "field 'problem': required field is empty"),
        ({"problem": "p", "solution": ""}, "field 'solution': required field is empty"),
        (
            {"problem": 12, "solution": "s"},
            "field 'problem': expected a string or a list of chat messages, got int",
        ),
        (
            {"problem": "p", "solution": ["a"]},
            "field 'solution': expected a string or a list of chat messages, got list",
        ),
        ({"problem": "p", "solution": "s", "answer": {"v": 1}}, "field 'answer': expected a"),
        ({"problem": "p", "solution": "s", "answer": True}, "field 'answer': expected a"),
    ],
)
def test_bad_field_values(tmp_path: Path, row: dict[str, Any], fragment: str) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], row])
    raises([str(path), "line 2", fragment], load_examples, str(path))


def test_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "d.txt"
    path.write_text("hello")
    raises(
        [
            str(path),
            "unsupported file type",
            ".jsonl",
            ".jsonl.gz",
            ".parquet",
            ".csv",
            "save_to_disk",
        ],
        load_examples,
        str(path),
    )


def test_corrupt_gzip_and_parquet(tmp_path: Path) -> None:
    gz = tmp_path / "d.jsonl.gz"
    gz.write_bytes(b"definitely not gzip")
    raises([str(gz), "cannot read"], load_examples, str(gz))
    bad = tmp_path / "d.parquet"
    bad.write_bytes(b"not parquet at all")
    raises([str(bad), "Parquet"], load_examples, str(bad))


def test_non_utf8(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"problem": "caf\xe9", "solution": "s"}\n')
    raises([str(path), "UTF-8"], load_examples, str(path))


def test_unknown_scheme_in_load(tmp_path: Path) -> None:
    raises(
        ["foo://bucket/x.jsonl", "unknown URI scheme 'foo://'"],
        load_examples,
        "foo://bucket/x.jsonl",
    )


# --------------------------------------------------------------------------- check_uri_scheme


@pytest.mark.parametrize(
    "uri",
    [
        "data/train.jsonl",
        "/definitely/not/there.parquet",  # existence is not checked
        "~/x.jsonl",
        "file:///nowhere/x.jsonl",
        "memory://bucket/x.jsonl",
        "simplecache::memory://bucket/x.jsonl",
        "dir#test",
    ],
)
def test_check_uri_scheme_accepts(uri: str) -> None:
    check_uri_scheme(uri)


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("foo://x/y.jsonl", "unknown URI scheme 'foo://'"),
        ("memory://", "has no path"),
    ],
)
def test_check_uri_scheme_rejects(uri: str, fragment: str) -> None:
    raises([fragment], check_uri_scheme, uri)


def test_check_uri_scheme_missing_package_names_it() -> None:
    try:
        import s3fs  # noqa: F401
    except ImportError:
        raises(["s3://", "s3fs"], check_uri_scheme, "s3://bucket/x.jsonl")
        raises(["s3://", "s3fs"], check_uri_scheme, "simplecache::s3://bucket/x.jsonl")
    else:  # pragma: no cover - depends on the environment
        check_uri_scheme("s3://bucket/x.jsonl")


def test_check_uri_scheme_does_not_read(memfs: tuple[Any, str]) -> None:
    fs, root = memfs
    check_uri_scheme(f"memory://{root}/missing.jsonl")
    assert not fs.exists(root)
