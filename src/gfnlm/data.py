"""Prompt datasets: a list of rows, each a dict with a ``prompt`` and any extra columns.

Accepted inputs: a list of dicts, a list of strings, a Hugging Face ``datasets.Dataset``,
or a file (``.jsonl``, ``.json`` holding a list, ``.csv`` with a header, ``.txt`` with one
prompt a line).  A malformed file is a :class:`~gfnlm.errors.DataError` naming the file,
the line and what to fix.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterable

from .errors import DataError


def read_utf8(path: str | Path) -> str:
    """The text of a data file; one that is not UTF-8 is a one-line :class:`DataError`."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}): save the file as UTF-8") from None


#: What ``json.loads`` raises: JSONDecodeError, ValueError for a number past Python's 4300-digit
#: limit, RecursionError for very deep nesting.
JSON_ERRORS = (ValueError, RecursionError)


def json_problem(e: Exception) -> str:
    """One line on why ``json.loads`` failed (see :data:`JSON_ERRORS`)."""
    if isinstance(e, json.JSONDecodeError):
        return e.msg
    return "a number with too many digits" if isinstance(e, ValueError) else "nested too deeply"


def load_rows(path: str | Path, prompt_column: str = "prompt") -> list[dict]:
    """Read a prompt file into rows; see the module docstring for the formats."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"dataset file '{path}' not found: pass an existing .jsonl, .json, .csv or .txt file")
    suffix = p.suffix.lower()
    text = read_utf8(p)
    rows: list[Any]
    if suffix == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except JSON_ERRORS as e:
                raise DataError(f"{p}: line {i} is not valid JSON ({json_problem(e)}): each line must be one JSON object") from None
    elif suffix == ".json":
        try:
            rows = json.loads(text)
        except JSON_ERRORS as e:
            where = f" at line {e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
            raise DataError(f"{p}: not valid JSON{where} ({json_problem(e)}): the file must hold a list of objects") from None
        if isinstance(rows, dict):
            rows = [rows]
        if not isinstance(rows, list):
            raise DataError(f"{p}: expected a JSON list of objects")
    elif suffix == ".csv":
        try:
            rows = list(csv.DictReader(text.splitlines()))
        except csv.Error as e:
            raise DataError(f"{p}: not valid CSV ({e}): give a header line, then one row a line") from None
    elif suffix in (".txt", ""):
        rows = [{prompt_column: line} for line in text.splitlines() if line.strip()]
    else:
        raise DataError(f"dataset file '{path}' has unknown extension '{suffix}': use .jsonl, .json, .csv or .txt")
    return normalise_rows(rows, prompt_column, source=str(p))


def normalise_rows(rows: Iterable[Any], prompt_column: str = "prompt", source: str = "dataset") -> list[dict]:
    """Turn strings or mappings into dicts with a non-empty string ``prompt``."""
    out = []
    for i, row in enumerate(rows, 1):
        if isinstance(row, str):
            row = {prompt_column: row}
        if not isinstance(row, dict):
            row = dict(row) if hasattr(row, "keys") else None
        if row is None:
            raise DataError(f"{source}: row {i} is not an object with a '{prompt_column}' field")
        if prompt_column not in row:
            raise DataError(f"{source}: row {i} has no '{prompt_column}' field (fields: {sorted(map(str, row))}): add a '{prompt_column}' column")
        if not isinstance(row[prompt_column], str) or not row[prompt_column].strip():
            raise DataError(f"{source}: row {i} has an empty or non-text '{prompt_column}'")
        out.append(dict(row, prompt=row[prompt_column]))
    if not out:
        raise DataError(f"{source}: no prompts found")
    return out


def as_rows(dataset, prompt_column: str = "prompt") -> list[dict]:
    """Accept a path, a list of strings/dicts, or a ``datasets.Dataset``."""
    if dataset is None:
        raise DataError("no training prompts: pass train_dataset (rows with a 'prompt') or set a task or dataset file")
    if isinstance(dataset, (str, Path)):
        return load_rows(dataset, prompt_column)
    return normalise_rows(list(dataset), prompt_column)


def render_prompt(tokenizer, text: str, mode: str = "auto") -> list[int]:
    """Token ids the policy conditions on: ``text`` in the chat template (``mode``) or plain."""
    use_chat = mode == "always" or (mode == "auto" and getattr(tokenizer, "chat_template", None))
    if use_chat:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("chat_template='always' but the tokenizer has no chat template: use chat_template: never")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if not ids and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id]
    return list(ids)
