"""Local VQA benchmarks: one question per record, with its image and reference answers.

Accepted on disk:
- a JSONL file, one object per line: ``image`` (a path, relative to the file's folder or absolute) or
  ``image_base64``, ``question``, ``answers`` (a list, or one string), optional ``question_id``;
- Parquet files (a file or a folder of ``*.parquet``), as benchmarks on the Hugging Face hub are stored;
- a Hugging Face ``datasets`` folder written by ``save_to_disk`` (``state.json`` plus Arrow stream files, or a
  ``dataset_dict.json`` with one folder per split), read with pyarrow so ``datasets`` need not be installed.
Parquet and Arrow images may be binary, a ``{bytes, path}`` struct (the ``datasets`` Image feature) or a path.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import ConfigError

METRIC_BY_BENCHMARK = {"textvqa": "vqa_accuracy", "vqav2": "vqa_accuracy", "docvqa": "anls",
                       "infovqa": "anls", "chartqa": "relaxed_accuracy"}


@dataclass
class Question:
    question_id: str
    image: bytes
    question: str
    answers: list[str]


@dataclass(frozen=True)
class Fields:
    image: str = "image"
    question: str = "question"
    answers: str = "answers"
    question_id: str = "question_id"


def metric_for(benchmark_name: str) -> str:
    """The benchmark's own metric, by name: VQA accuracy (TextVQA), ANLS (DocVQA), relaxed accuracy (ChartQA),
    exact match for anything else."""
    name = benchmark_name.lower()
    return next((metric for key, metric in METRIC_BY_BENCHMARK.items() if key in name), "exact_match")


def _image_bytes(value: Any, base: Path, where: str) -> bytes:
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str) and value:
        path = Path(value) if Path(value).is_absolute() else base / value
        if not path.is_file():
            raise ConfigError(f"benchmark: {where}: image file {path} does not exist")
        return path.read_bytes()
    raise ConfigError(f"benchmark: {where}: no image (expected bytes, a {{bytes, path}} struct or a file path)")


def _question(record: dict[str, Any], index: int, base: Path, fields: Fields, where: str) -> Question:
    answers = record.get(fields.answers)
    if isinstance(answers, str):
        answers = [answers]
    if not answers or fields.question not in record:
        raise ConfigError(f"benchmark: {where}: needs '{fields.question}' and a non-empty '{fields.answers}'")
    if fields.image not in record and "image_base64" in record:
        image = base64.b64decode(record["image_base64"])
    else:
        image = _image_bytes(record.get(fields.image), base, where)
    question_id = record.get(fields.question_id)
    return Question(str(index if question_id is None else question_id), image, str(record[fields.question]),
                    [str(a) for a in answers])


def _jsonl_records(path: Path) -> Iterator[tuple[dict[str, Any], str]]:
    with path.open() as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    yield json.loads(line), f"{path}:{number}"
                except ValueError as exc:
                    raise ConfigError(f"benchmark: {path}:{number}: not JSON ({exc})") from None


def _table_records(table: pa.Table, where: str) -> Iterator[tuple[dict[str, Any], str]]:
    for index, record in enumerate(table.to_pylist()):
        yield record, f"{where} row {index}"


def _arrow_stream(path: Path) -> pa.Table:
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all()


def _saved_dataset(folder: Path, split: str) -> pa.Table:
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
        if split not in splits:
            raise ConfigError(f"split: {folder} holds splits {splits}, not {split!r}")
        folder = folder / split
    state = json.loads((folder / "state.json").read_text())
    return pa.concat_tables([_arrow_stream(folder / f["filename"]) for f in state["_data_files"]])


def read_benchmark(path: str, split: str = "test", fields: Fields = Fields(), limit: int | None = None) -> list[Question]:
    location = Path(path)
    if location.is_file() and location.suffix == ".jsonl":
        records, base = _jsonl_records(location), location.parent
    elif location.is_file() and location.suffix == ".parquet":
        records, base = _table_records(pq.read_table(location), str(location)), location.parent
    elif location.is_dir() and ((location / "state.json").is_file() or (location / "dataset_dict.json").is_file()):
        records, base = _table_records(_saved_dataset(location, split), str(location)), location
    elif location.is_dir() and sorted(location.glob("*.parquet")):
        table = pa.concat_tables([pq.read_table(p) for p in sorted(location.glob("*.parquet"))])
        records, base = _table_records(table, str(location)), location
    else:
        raise ConfigError(
            f"benchmark: {path} is not a .jsonl file, a .parquet file or folder, or a datasets save_to_disk folder"
        )
    questions = []
    for index, (record, where) in enumerate(records):
        if limit is not None and index >= limit:
            break
        questions.append(_question(record, index, base, fields, where))
    if not questions:
        raise ConfigError(f"benchmark: {path} holds no questions")
    if len({q.question_id for q in questions}) < len(questions):
        raise ConfigError(f"benchmark: {path} repeats a '{fields.question_id}'; answers are resumed by question id")
    return questions
