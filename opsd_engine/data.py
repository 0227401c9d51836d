"""Dataset loading: turns a dataset URI into validated training / eval `Example` rows.

This module owns everything between "the user gave us a dataset URI" and "a list of
`Example` objects": resolving the URI to a filesystem (local paths, ``file://`` and any
fsspec-backed remote such as ``s3://``, ``gs://``, ``memory://``, ``http(s)://``),
picking a reader from the file extension, streaming the rows, mapping user column names
(or dotted paths into nested fields) onto ``problem`` / ``solution`` / ``answer``, reading
chat-message lists (TRL conversational and prompt-completion layouts, verl's parquet layout),
and producing readable `DatasetError` messages that name the source, the line or row, and the
field at fault. Which locations may be opened at all is not decided here (a caller's policy).

Supported sources
-----------------
* ``.jsonl`` / ``.ndjson``: one JSON object per line, streamed line by line; blank lines
  are skipped. ``.json``: a list of objects, or an object holding exactly one list of
  objects (e.g. ``{"data": [...]}``). ``.csv``: a header row then one record per row.
  Each of these may carry a compression suffix (``.gz``, ``.bz2``, ``.xz``, ``.lzma``),
  decompressed on the fly.
* ``.parquet``: read in record batches with pyarrow.
* A directory written by ``datasets.Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``
  (recognised by ``state.json``, ``dataset_info.json`` or ``dataset_dict.json``). For a
  ``DatasetDict`` the ``train`` split is used unless a split is chosen with a URI
  fragment: ``path/to/dir#test`` (or ``s3://bucket/dir#validation``).
* Any other directory: its data files (shards, all of one format; names starting with
  ``.`` or ``_`` such as ``_SUCCESS`` are ignored), read in sorted name order, with row
  indices continuing across shards. Subdirectories are not descended into.

Heavy libraries (``datasets``, ``pyarrow``) are imported lazily, only by the readers that
need them.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import io
import json
import math
import os
import posixpath
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TextIO

import fsspec
from fsspec.core import split_protocol, url_to_fs
from fsspec.registry import known_implementations
from fsspec.utils import compressions

__all__ = [
    "DEFAULT_FIELDS",
    "SUPPORTED_EXTENSIONS",
    "DatasetError",
    "Example",
    "check_uri_scheme",
    "load_examples",
    "lookup_field",
]

_TEXT_FORMATS: dict[str, str] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
}
_BINARY_FORMATS: dict[str, str] = {".parquet": "parquet"}
# Compression suffixes fsspec can decode transparently ("zip" is an archive, not a stream codec).
_COMPRESSION_SUFFIXES: tuple[str, ...] = tuple(f".{ext}" for ext in compressions if ext != "zip")
SUPPORTED_EXTENSIONS: tuple[str, ...] = (
    *_TEXT_FORMATS,
    *(f"{ext}{comp}" for ext in _TEXT_FORMATS for comp in _COMPRESSION_SUFFIXES),
    *_BINARY_FORMATS,
)
_SAVE_TO_DISK_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")
_PARQUET_BATCH_ROWS = 1024

# Column names users commonly have in place of ours; used only to hint at a mapping mistake.
_FIELD_ALIASES: dict[str, tuple[str, ...]] = {
    "problem": ("question", "prompt", "input", "instruction", "query", "task", "text"),
    "solution": ("reasoning", "rationale", "explanation", "response", "output", "completion"),
    "answer": ("final_answer", "target", "label", "gold", "ground_truth", "output"),
}


@dataclass(frozen=True)
class Example:
    """One training / eval row.

    ``solution`` is the reference solution shown to the teacher (privileged information);
    it is required for training sets and may be ``None`` for eval sets. ``index`` is the
    0-based position of the row among the data rows of the source (blank JSONL lines are
    not rows; for a directory of shards it counts across shards in sorted order).
    ``extra`` holds every other field of the row, untouched, for metadata. ``system_prompt`` is
    the system message of a chat-message problem (see :func:`load_examples`), else ``None``.
    """

    problem: str
    solution: str | None
    answer: str | None
    index: int
    extra: dict[str, Any] = field(default_factory=dict, hash=False)
    system_prompt: str | None = None


class DatasetError(ValueError):
    """A dataset could not be loaded; the message names the source, line/row and field.

    ``uri`` is the file (or URI) at fault, ``line`` the 1-based line number for line-based
    formats (JSONL, CSV), ``row`` the 0-based row index for formats without meaningful line
    numbers (JSON, Parquet, ``save_to_disk`` directories; shown as "row index N"), and
    ``field`` the offending field.
    """

    def __init__(
        self,
        uri: str,
        message: str,
        *,
        line: int | None = None,
        row: int | None = None,
        field: str | None = None,
    ) -> None:
        self.uri = uri
        self.line = line
        self.row = row
        self.field = field
        self.reason = message
        where = [uri]
        if line is not None:
            where.append(f"line {line}")
        if row is not None:
            where.append(f"row index {row}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(f"{', '.join(where)}: {message}")


# --------------------------------------------------------------------------- URI handling


def _install_hint(protocol: str) -> str:
    """Best-effort "pip install X" hint for an fsspec protocol whose package is missing."""
    impl = known_implementations.get(protocol)
    if impl is None:
        return ""
    package = impl["class"].split(".", 1)[0]
    if package == "fsspec":  # built-in class with third-party deps (e.g. http needs aiohttp)
        return ""  # fsspec's own ImportError text already names the packages
    return f"; install the {package!r} package (pip install {package})"


def check_uri_scheme(uri: str) -> None:
    """Validate that ``uri`` is non-empty and every scheme in it has an fsspec filesystem.

    Cheap enough for request validation: it imports the filesystem class (so a missing
    ``s3fs`` / ``gcsfs`` / ``aiohttp`` is caught) but never connects or reads data, and it
    does not check that the path exists. Local paths without a scheme are always accepted.
    Chained URIs (``simplecache::s3://bucket/x.jsonl``) have each scheme checked.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise DatasetError(repr(uri), "dataset URI is empty")
    parts = uri.split("::")
    for position, part in enumerate(parts):
        is_target = position == len(parts) - 1
        protocol, path = split_protocol(part)
        if protocol is None and not is_target and "://" not in part:
            protocol, path = part, "x"  # a bare wrapper scheme such as "simplecache"
        if protocol is None:
            continue
        try:
            fsspec.get_filesystem_class(protocol)
        except ValueError:
            raise DatasetError(
                uri,
                f"unknown URI scheme '{protocol}://': no fsspec filesystem implements it",
            ) from None
        except ImportError as exc:
            raise DatasetError(
                uri,
                f"URI scheme '{protocol}://' is not available ({exc}){_install_hint(protocol)}",
            ) from None
        if is_target and not path.strip("/"):
            raise DatasetError(uri, f"URI '{protocol}://' has no path")


def _split_fragment(uri: str) -> tuple[str, str | None]:
    """Split an optional ``#split`` suffix off ``uri`` (only when it looks like a split name)."""
    base, sep, fragment = uri.rpartition("#")
    if sep and base and _SPLIT_RE.match(fragment):
        return base, fragment
    return uri, None


def _resolve(uri: str, storage_options: Mapping[str, Any] | None) -> tuple[Any, str, str]:
    """Return ``(filesystem, path, normalised_uri)``; local paths get ``~`` expanded."""
    check_uri_scheme(uri)
    if "::" not in uri and split_protocol(uri)[0] is None:
        uri = os.path.abspath(os.path.expanduser(uri))
    try:
        fs, path = url_to_fs(uri, **dict(storage_options or {}))
    except ImportError as exc:  # pragma: no cover - check_uri_scheme catches these first
        raise DatasetError(uri, f"cannot open filesystem ({exc})") from None
    except Exception as exc:
        raise DatasetError(uri, f"cannot open filesystem: {type(exc).__name__}: {exc}") from exc
    return fs, path, uri


def _exists(fs: Any, path: str, uri: str) -> bool:
    try:
        return bool(fs.exists(path))
    except Exception as exc:
        raise DatasetError(uri, f"cannot access source: {type(exc).__name__}: {exc}") from exc


def _child_uri(parent_uri: str, parent_path: str, child_path: str) -> str:
    """URI of a file found under a directory, keeping the scheme of the parent for messages."""
    rel = posixpath.relpath(child_path, parent_path)
    return f"{parent_uri.rstrip('/')}/{rel}"


# --------------------------------------------------------------------------- formats


def _format_of(path: str) -> str | None:
    """Return the reader name for a file name (compression suffixes allowed), or None."""
    name = posixpath.basename(path).lower()
    compressed = name.endswith(_COMPRESSION_SUFFIXES)
    if compressed:
        name = name.rsplit(".", 1)[0]
    for ext, fmt in _TEXT_FORMATS.items():
        if name.endswith(ext):
            return fmt
    if not compressed:
        for ext, fmt in _BINARY_FORMATS.items():
            if name.endswith(ext):
                return fmt
    return None


def _open_text(fs: Any, path: str) -> TextIO:
    # utf-8-sig: tolerate the BOM that spreadsheet tools put at the start of exports.
    return fs.open(path, "rt", compression="infer", encoding="utf-8-sig", newline="")


# Each reader yields (location, row) where location is (line, row_index) and row is the raw
# decoded value (not yet checked to be a mapping). Exactly one of line / row_index is set.
_Located = tuple[tuple[int | None, int | None], Any]


def _iter_jsonl(fs: Any, path: str, uri: str) -> Iterator[_Located]:
    with _open_text(fs, path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(
                    uri, f"malformed JSON: {exc.msg} (column {exc.colno})", line=lineno
                ) from None
            yield (lineno, None), value


def _iter_json(fs: Any, path: str, uri: str) -> Iterator[_Located]:
    with _open_text(fs, path) as f:
        text = f.read()
    if not text.strip():
        raise DatasetError(uri, "file is empty")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(
            uri, f"malformed JSON: {exc.msg} (column {exc.colno})", line=exc.lineno
        ) from None
    if isinstance(value, dict):
        lists = [k for k, v in value.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise DatasetError(
                uri,
                "a top-level JSON object must hold exactly one list of rows; found "
                f"{len(lists)} list-valued keys ({', '.join(map(repr, lists)) or 'none'}) "
                f"among keys {_describe_keys(value)}",
            )
        value = value[lists[0]]
    if not isinstance(value, list):
        raise DatasetError(
            uri,
            f"expected a JSON list of objects (or an object holding one), got "
            f"{type(value).__name__}",
        )
    for i, item in enumerate(value):
        yield (None, i), item


def _iter_csv(fs: Any, path: str, uri: str) -> Iterator[_Located]:
    with _open_text(fs, path) as f:
        reader = csv.reader(f, strict=True)  # strict: stray/unterminated quotes are errors
        try:
            header = next(reader, None)
            if header is None:
                raise DatasetError(uri, "file is empty")
            seen: set[str] = set()
            for col in header:
                if col in seen:
                    raise DatasetError(uri, f"duplicate column {col!r} in header", line=1)
                seen.add(col)
            prev_end = reader.line_num
            for record in reader:
                start, prev_end = prev_end + 1, reader.line_num
                if not record or all(not cell.strip() for cell in record):
                    continue
                if len(record) > len(header):
                    raise DatasetError(
                        uri,
                        f"row has {len(record)} values but the header has {len(header)} columns",
                        line=start,
                    )
                yield (start, None), dict(zip(header, record, strict=False))
        except csv.Error as exc:
            raise DatasetError(uri, f"malformed CSV: {exc}", line=reader.line_num) from None


def _iter_parquet(fs: Any, path: str, uri: str) -> Iterator[_Located]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        try:
            pfile = pq.ParquetFile(f)
            i = 0
            for batch in pfile.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
                for item in batch.to_pylist():
                    yield (None, i), item
                    i += 1
        except (pa.ArrowException, OSError) as exc:
            raise DatasetError(uri, f"cannot read Parquet: {exc}") from None


_READERS = {"jsonl": _iter_jsonl, "json": _iter_json, "csv": _iter_csv, "parquet": _iter_parquet}


def _iter_saved_dataset(
    fs: Any, path: str, uri: str, split: str | None, storage_options: Mapping[str, Any] | None
) -> Iterator[_Located]:
    import datasets

    is_local = split_protocol(uri)[0] in (None, "file") and "::" not in uri
    try:
        loaded = datasets.load_from_disk(
            path if is_local else uri, storage_options=dict(storage_options or {}) or None
        )
    except Exception as exc:
        raise DatasetError(
            uri, f"cannot load dataset saved with save_to_disk: {type(exc).__name__}: {exc}"
        ) from exc
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded.keys())
        chosen = split or "train"
        if chosen not in loaded:
            what = f"split {split!r} not found" if split else "no 'train' split"
            raise DatasetError(
                uri,
                f"{what} in DatasetDict; available splits: {', '.join(splits)} "
                f"(select one with '{uri}#<split>')",
            )
        loaded = loaded[chosen]
    elif split is not None:
        raise DatasetError(
            uri, f"split {split!r} requested, but this directory holds a single Dataset"
        )
    for i, item in enumerate(loaded):
        yield (None, i), item


# --------------------------------------------------------------------------- row mapping


def _describe_keys(row: Mapping[Any, Any], limit: int = 20) -> str:
    keys = [repr(k) for k in row]
    if not keys:
        return "(none)"
    if len(keys) > limit:
        return ", ".join(keys[:limit]) + f", ... ({len(keys) - limit} more)"
    return ", ".join(keys)


def _mapping_hint(row: Mapping[Any, Any], role: str, field_name: str) -> str:
    """Suggest a column that probably holds ``role`` (e.g. ``question`` for ``problem``)."""
    keys = [k for k in row if isinstance(k, str)]
    candidates = [k for k in _FIELD_ALIASES.get(role, ()) if k in row]
    candidates += [
        k for k in difflib.get_close_matches(field_name, keys, n=2) if k not in candidates
    ]
    if not candidates:
        return ""
    return f"; if {candidates[0]!r} holds it, pass {role}_field={candidates[0]!r}"


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


_MISSING: Any = object()  # "the row has no such field" (a null value is not missing)

#: The default column name of each role. A field the user names (any other name) must be present
#: in every row; the default names are used when present (``answer``, and ``solution`` of eval
#: sets, may be absent).
DEFAULT_FIELDS: dict[str, str] = {"problem": "problem", "solution": "solution", "answer": "answer"}


def lookup_field(row: Mapping[str, Any], path: str) -> Any:
    """The value at ``path`` in ``row``, or ``_MISSING``.

    ``path`` is a column name, or a dotted path into nested objects and lists
    (``reward_model.ground_truth``, ``extra_info.answer``, ``choices.0.text``). A column whose
    name itself contains dots is found first.
    """
    if path in row:
        return row[path]
    if "." not in path:
        return _MISSING
    value: Any = row
    for part in path.split("."):
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        elif isinstance(value, list | tuple) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def _is_messages(value: Any) -> bool:
    """A chat-message list: ``[{"role": ..., "content": ...}, ...]`` (OpenAI / TRL / verl)."""
    return (
        isinstance(value, list | tuple)
        and len(value) > 0
        and all(isinstance(m, Mapping) and isinstance(m.get("role"), str) for m in value)
    )


def _message_text(message: Mapping[str, Any]) -> str | None:
    """A message's text: a string ``content``, or its ``text`` parts joined by newlines (as
    vLLM and the OpenAI API join multi-part content)."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list | tuple):
        texts = [
            part["text"]
            for part in content
            if isinstance(part, Mapping)
            and part.get("type", "text") == "text"
            and isinstance(part.get("text"), str)
        ]
        return "\n".join(texts) if texts else None
    return None


# Which message of a chat-message list holds each role's text.
_MESSAGE_ROLE = {"problem": "user", "solution": "assistant"}


def _from_messages(
    messages: list[Any] | tuple[Any, ...], role: str, **loc: Any
) -> tuple[str, str | None]:
    """``(text, system prompt)`` of a chat-message list: the problem is the last user message,
    the solution the last assistant message; the system prompt is the first system message."""
    wanted = _MESSAGE_ROLE.get(role)
    field_name = loc.pop("field_name")

    def error(message: str) -> DatasetError:
        return DatasetError(
            loc["uri"], message, line=loc["line"], row=loc["index"], field=field_name
        )

    if wanted is None:
        raise error(
            f"expected a string or a number, got a list of chat messages ({_short_repr(messages)})"
        )
    chosen = [m for m in messages if m["role"] == wanted]
    text = _message_text(chosen[-1]) if chosen else None
    if not text or not text.strip():
        roles = ", ".join(repr(m["role"]) for m in messages)
        what = f"no {wanted!r} message" if not chosen else f"the last {wanted!r} message is empty"
        raise error(f"chat messages have {what} (roles: {roles})")
    systems = [m for m in messages if m["role"] == "system"]
    system = _message_text(systems[0]) if systems else None
    return text, (system if system and system.strip() else None)


def _text_value(
    row: Mapping[str, Any],
    field_name: str,
    *,
    role: str,
    required: bool,
    allow_numbers: bool,
    uri: str,
    line: int | None,
    index: int | None,
) -> tuple[Any, str | None]:
    """``(text, system prompt)`` of ``field_name`` in ``row``; text is ``_MISSING`` when the row
    has no such field and ``None`` when its value is null or empty (both only when not
    ``required``)."""
    value = lookup_field(row, field_name)
    if value is _MISSING:
        if not required:
            return _MISSING, None
        raise DatasetError(
            uri,
            f"missing required field; the row has fields {_describe_keys(row)}"
            f"{_mapping_hint(row, role, field_name)}",
            line=line,
            row=index,
            field=field_name,
        )
    if _is_missing(value) or (isinstance(value, list | tuple) and not value):
        if not required:
            return None, None
        shown = "null" if value is None or isinstance(value, float) else "empty"
        raise DatasetError(
            uri, f"required field is {shown}", line=line, row=index, field=field_name
        )
    if isinstance(value, str):
        return value, None
    if allow_numbers and isinstance(value, int | float | Decimal) and not isinstance(value, bool):
        return str(value), None
    if _is_messages(value):
        return _from_messages(value, role, field_name=field_name, uri=uri, line=line, index=index)
    expected = "a string or a number" if allow_numbers else "a string or a list of chat messages"
    raise DatasetError(
        uri,
        f"expected {expected}, got {type(value).__name__} ({_short_repr(value)})",
        line=line,
        row=index,
        field=field_name,
    )


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _to_example(
    raw: Any,
    *,
    uri: str,
    line: int | None,
    source_row: int | None,
    index: int,
    problem_field: str,
    solution_field: str | None,
    answer_field: str | None,
    require_solution: bool,
) -> tuple[Example, set[str]]:
    """The example of one row, and the names of the optional fields the row does not have."""
    if not isinstance(raw, Mapping):
        kind = "JSON " + type(raw).__name__ if line is not None else type(raw).__name__
        raise DatasetError(
            uri, f"expected an object with named fields, got {kind}", line=line, row=source_row
        )
    loc = {"uri": uri, "line": line, "index": source_row}
    problem, system = _text_value(
        raw, problem_field, role="problem", required=True, allow_numbers=False, **loc
    )
    absent: set[str] = set()
    solution: Any = None
    if solution_field is not None:
        solution, _ = _text_value(
            raw,
            solution_field,
            role="solution",
            required=require_solution,
            allow_numbers=False,
            **loc,
        )
    answer: Any = None
    if answer_field is not None:
        answer, _ = _text_value(
            raw, answer_field, role="answer", required=False, allow_numbers=True, **loc
        )
    for name, value in ((solution_field, solution), (answer_field, answer)):
        if value is _MISSING:
            absent.add(str(name))
    used = {
        f.split(".", 1)[0] if f not in raw else f
        for f in (problem_field, solution_field, answer_field)
        if f is not None
    }
    extra = {k: v for k, v in raw.items() if k not in used}
    example = Example(
        problem=problem,
        solution=None if solution is _MISSING else solution,
        answer=None if answer is _MISSING else answer,
        index=index,
        extra=extra,
        system_prompt=system,
    )
    return example, absent


@dataclass
class _Presence:
    """How many rows have a named optional field, and where the first one without it is."""

    role: str
    rows_with: int = 0
    first_without: tuple[str, int | None, int | None, Mapping[str, Any]] | None = None

    def check(self, name: str, rows: int) -> None:
        if self.first_without is None:
            return
        uri, line, row, raw = self.first_without
        if self.rows_with == 0:
            raise DatasetError(
                uri,
                f"no row has this field (checked {rows} rows); this row has fields "
                f"{_describe_keys(raw)}{_mapping_hint(raw, self.role, name)}",
                line=line,
                row=row,
                field=name,
            )
        raise DatasetError(
            uri,
            f"field missing from this row, the first of {rows - self.rows_with} of {rows} rows "
            f"without it; the row has fields {_describe_keys(raw)}",
            line=line,
            row=row,
            field=name,
        )


# --------------------------------------------------------------------------- entry point


def _sources(
    fs: Any, path: str, uri: str, split: str | None, storage_options: Mapping[str, Any] | None
) -> Iterator[tuple[str, Iterator[_Located]]]:
    """Yield ``(uri_for_messages, row_iterator)`` for each file making up the dataset."""
    try:
        is_dir = bool(fs.isdir(path))
    except Exception as exc:
        raise DatasetError(uri, f"cannot access source: {type(exc).__name__}: {exc}") from exc
    if is_dir:
        names = {posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)}
        if any(marker in names for marker in _SAVE_TO_DISK_MARKERS):
            yield uri, _iter_saved_dataset(fs, path, uri, split, storage_options)
            return
        if split is not None:
            raise DatasetError(
                uri, f"split {split!r} requested, but this is not a save_to_disk directory"
            )
        shards = [
            (p, fmt)
            for p in sorted(fs.find(path, maxdepth=1))
            if (fmt := _format_of(p)) is not None
            and not posixpath.basename(p).startswith((".", "_"))
        ]
        if not shards:
            raise DatasetError(
                uri,
                "directory holds no data files and is not a datasets save_to_disk directory; "
                f"supported files: {', '.join(SUPPORTED_EXTENSIONS)}",
            )
        by_format: dict[str, list[str]] = {}
        for shard, fmt in shards:
            by_format.setdefault(fmt, []).append(posixpath.basename(shard))
        if len(by_format) > 1:
            found = "; ".join(f"{fmt}: {', '.join(names)}" for fmt, names in by_format.items())
            raise DatasetError(
                uri,
                "directory of shards mixes file formats; point at a single file or keep one "
                f"format per directory (found {found})",
            )
        for shard, fmt in shards:
            shard_uri = _child_uri(uri, path, shard)
            yield shard_uri, _READERS[fmt](fs, shard, shard_uri)
        return
    if split is not None:
        raise DatasetError(
            uri, f"split {split!r} requested, but only save_to_disk directories have splits"
        )
    fmt = _format_of(path)
    if fmt is None:
        raise DatasetError(
            uri,
            "unsupported file type; supported: "
            f"{', '.join(SUPPORTED_EXTENSIONS)}, or a datasets save_to_disk directory",
        )
    yield uri, _READERS[fmt](fs, path, uri)


def load_examples(
    uri: str,
    *,
    problem_field: str = "problem",
    solution_field: str | None = "solution",
    answer_field: str | None = "answer",
    require_solution: bool = True,
    limit: int | None = None,
    storage_options: dict[str, Any] | None = None,
) -> list[Example]:
    """Load and validate the examples at ``uri``.

    ``problem_field`` / ``solution_field`` / ``answer_field`` name the source columns that
    hold each part (``None`` for solution/answer: the source has none); a name may be a dotted
    path into nested objects (``reward_model.ground_truth``, see :func:`lookup_field`). The
    problem is always required; the solution is required when ``require_solution`` (training
    sets) and otherwise ``None`` when absent (eval sets); the answer is optional, and an integer
    or float answer is converted to ``str``. An optional field named other than its default
    (``answer``, ``solution``) must be in every row: a name no row has (a typo) or a row without
    it is an error naming the field, the file and the (first such) row.

    A problem or solution may be a list of chat messages (``[{"role", "content"}, ...]``, the
    layout of TRL's conversational and prompt-completion datasets and of verl's parquet files):
    the problem is the last ``user`` message, the solution the last ``assistant`` message, and
    the first ``system`` message of the problem becomes ``Example.system_prompt``.

    ``limit`` stops reading after that many rows. ``storage_options`` are passed to the fsspec
    filesystem (credentials, endpoints, ...). Which URIs a caller may open is the caller's
    policy: this function reads what it is given.

    Raises `DatasetError` naming the source, line/row and field for any unreadable source
    or invalid row; a source with zero rows is an error.
    """
    if limit is not None and (isinstance(limit, bool) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    if require_solution and solution_field is None:
        raise DatasetError(
            uri, "require_solution=True but solution_field is None", field="solution"
        )
    check_uri_scheme(uri)

    base, split = _split_fragment(uri)
    fs, path, resolved = _resolve(base, storage_options)
    if not _exists(fs, path, resolved):
        # "data#1.jsonl" is a file name, not a split selector, if that is what exists.
        if split is not None:
            full_fs, full_path, full_resolved = _resolve(uri, storage_options)
            if _exists(full_fs, full_path, full_resolved):
                fs, path, resolved, split = full_fs, full_path, full_resolved, None
        if split is not None or not _exists(fs, path, resolved):
            shown = uri if resolved == base else f"{uri} (resolved to {resolved})"
            raise DatasetError(shown, "dataset not found (no such file or directory)")

    # Optional fields the user named (not the default name) must be in every row.
    named = {
        name: _Presence(role)
        for role, name, required in (
            ("solution", solution_field, require_solution),
            ("answer", answer_field, False),
        )
        if name is not None and not required and name != DEFAULT_FIELDS[role]
    }
    examples: list[Example] = []
    for source_uri, rows in _sources(fs, path, resolved, split, storage_options):
        try:
            with contextlib.closing(rows):  # closes the open file when `limit` stops early
                for (line, source_row), raw in rows:
                    example, absent = _to_example(
                        raw,
                        uri=source_uri,
                        line=line,
                        source_row=source_row,
                        index=len(examples),
                        problem_field=problem_field,
                        solution_field=solution_field,
                        answer_field=answer_field,
                        require_solution=require_solution,
                    )
                    examples.append(example)
                    for name, presence in named.items():
                        if name not in absent:
                            presence.rows_with += 1
                        elif presence.first_without is None:
                            presence.first_without = (source_uri, line, source_row, raw)
                    if limit is not None and len(examples) >= limit:
                        break
        except UnicodeDecodeError as exc:
            raise DatasetError(source_uri, f"not valid UTF-8 text: {exc}") from None
        except (EOFError, OSError, io.UnsupportedOperation) as exc:
            raise DatasetError(source_uri, f"cannot read: {type(exc).__name__}: {exc}") from exc
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise DatasetError(resolved, "dataset has no rows")
    for name, presence in named.items():
        presence.check(name, len(examples))
    return examples
