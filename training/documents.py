"""Documents a user writes (train configs, sweep files, `--set` edits): read as plain YAML and checked, never run.

Every problem is found before any work and reported as one `UserError`
that names the file, the field (e.g. `method.params.alpha`) and the fix:
malformed YAML, Python tags, values no config holds, documents that expand
through aliases or nest without end, and pydantic's validation errors.
"""

from __future__ import annotations

import datetime
import math
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from kdarena.zoo.errors import UserError


def validate_document(model: type[BaseModel], raw: dict[str, Any], source: str):
    """`model` from a loaded document, or one UserError naming the file and the first bad field."""
    check_document(raw, source)
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise UserError(f"{source}: {format_validation_error(exc)}") from None


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """First error of a pydantic validation as `field.path: message (got value)`."""
    err = exc.errors()[0]
    parts = (tuple(prefix.split(".")) if prefix else ()) + tuple(err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if parts and parts[-1] == "[key]":  # pydantic's marker for a bad key of a mapping
        parts, msg = parts[:-1], f"the key: {msg}"
    loc = field_path(parts)
    if err["type"] == "extra_forbidden":
        msg = "unknown field; remove it or check its spelling"
    elif err["type"] == "union_tag_invalid":  # a named choice, e.g. augment: {policy: rotate}
        ctx = err.get("ctx", {})
        known = str(ctx.get("expected_tags", "")).replace("'", "")
        msg = f"unknown {ctx.get('discriminator', 'name').strip(chr(39))} {show(ctx.get('tag'))}; known: {known}"
    got = err.get("input")
    shown = "" if err["type"] in ("missing", "extra_forbidden") or isinstance(got, dict) else f" (got {show(got)})"
    more = len(exc.errors()) - 1
    return f"{loc or '(top level)'}: {msg}{shown}" + (f"; and {more} more error(s)" if more else "")


_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_/-]{1,60}$")


# a YAML file is small, but aliases can make it expand to billions of values, or refer to itself
MAX_DEPTH = 50


MAX_VALUES = 100_000


MAX_INT = 2**63 - 1  # every count, size and seed kdarena passes on fits in 64 bits


_NOT_CONFIG_VALUES = {bytes: "binary data (!!binary)", datetime.datetime: "a timestamp", datetime.date: "a date",
                      set: "a set (!!set)"}


def show(value: Any, limit: int = 60) -> str:
    """A user's value quoted for a one-line message: repr (control characters escaped), shortened, safe for any size."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
        return f"a {value.bit_length()}-bit number"
    if isinstance(value, (dict, list, tuple, set)) and len(value) > 20:
        return f"a {type(value).__name__} of {len(value)} items"
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def field_path(parts: tuple[Any, ...] | list[Any]) -> str:
    """`teacher.recipe.lr`; a key that is not a plain name is quoted, so the message stays one readable line."""
    return ".".join(p if isinstance(p, str) and _PLAIN_KEY.match(p) else show(p, 40) for p in parts)


def check_document(raw: Any, source: str) -> None:
    """Refuse what no config field takes, before validation walks it, naming the field.

    Values that would crash or hang later instead of failing now: documents
    that refer to themselves or expand past MAX_VALUES values through YAML
    aliases, nesting deeper than MAX_DEPTH, NaN and infinite numbers,
    integers beyond 64 bits, text with NUL characters or unpaired surrogates,
    and YAML types that are not plain data (binary, dates, sets).
    """
    seen = 0

    def text_problem(text: str) -> str | None:
        if "\x00" in text:
            return "holds a NUL character"
        if any("\ud800" <= c <= "\udfff" for c in text):
            return "holds an unpaired surrogate (\\ud800-\\udfff), which no file name or label can hold"
        return None

    def fail(path: list[Any], problem: str) -> None:
        raise UserError(f"{source}: {field_path(path) or '(top level)'}: {problem}")

    def kind(value: Any) -> str:
        return next((name for t, name in _NOT_CONFIG_VALUES.items() if isinstance(value, t)), type(value).__name__)

    def check_key(key: Any, path: list[Any]) -> None:
        if isinstance(key, str):
            problem = text_problem(key)
            if problem:
                fail(path, f"a key {problem}; remove it")
        elif key is None or isinstance(key, (bool, int, float)):  # every mapping in a config is named fields
            read_as = "null" if key is None else "a boolean" if isinstance(key, bool) else "a number"
            fail(path, f"the key {show(key)} is not a name (YAML reads it as {read_as}); quote it or rename it")
        else:
            fail(path, f"a key is {kind(key)}; keys are names")

    def visit(node: Any, path: list[Any], parents: set[int]) -> None:
        nonlocal seen
        seen += 1
        if seen > MAX_VALUES:
            raise UserError(f"{source}: the document expands to more than {MAX_VALUES:,} values (aliases of "
                            "aliases?); a config is a few dozen plain values")
        if node is None or isinstance(node, bool):
            return
        if isinstance(node, int):
            if abs(node) > MAX_INT:
                fail(path, f"{show(node)} is out of range; give a number below 2**63")
        elif isinstance(node, float):
            if not math.isfinite(node):
                fail(path, f"{node} is not a finite number; give a finite value")
        elif isinstance(node, str):
            problem = text_problem(node)
            if problem:
                fail(path, f"the text {problem}; remove it")
        elif isinstance(node, (dict, list)):
            if id(node) in parents:
                fail(path, "refers to itself (a YAML alias inside its own anchor); write the value out")
            if len(path) >= MAX_DEPTH:
                fail(path, f"nested more than {MAX_DEPTH} levels deep; a config is a few levels of sections")
            parents.add(id(node))
            for key, value in (node.items() if isinstance(node, dict) else enumerate(node)):
                if isinstance(node, dict):
                    check_key(key, path)
                visit(value, [*path, key], parents)
            parents.discard(id(node))
        else:
            fail(path, f"{kind(node)} is not a config value; quote it if you mean text")

    visit(raw, [], set())


class _PlainLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` (no Python tags) whose failures on a tagged value (`!!int` with no digits, `!!bool maybe`,
    a 5,000-digit number) are YAML errors at the value's line, not an IndexError from inside PyYAML."""

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep)
        except (yaml.YAMLError, RecursionError):
            raise
        except Exception as exc:
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            if "integer string conversion" in str(exc):
                problem = "a number with more than 4300 digits"
            else:
                value = show(node.value) if isinstance(node.value, str) else "this value"
                reason = f" ({str(exc)[:80]})" if type(exc) is ValueError else ""
                problem = f"{value} is not a valid {tag}{reason}"
            raise _BadValue(None, None, problem, node.start_mark) from None


class _BadValue(yaml.constructor.ConstructorError):
    """A value YAML typed (by its tag or its look, e.g. 2024-13-01 as a date) but cannot construct."""


def read_yaml_text(text: str, fix_syntax: str = "fix the file's syntax") -> list[Any]:
    """Plain YAML data, never Python objects. Any problem is a ValueError whose text says what and how to fix it."""
    try:
        return list(yaml.load_all(text, Loader=_PlainLoader))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        tag = re.match(r"could not determine a constructor for the tag '(?:(tag:yaml\.org,2002:)|)(.*)'$", problem)
        if len(problem) > 200:  # PyYAML quotes the offending token whole: an alias name can be pages long
            problem = problem[:199] + "…"
        if tag:
            name = ("!!" if tag.group(1) else "") + tag.group(2)
            raise ValueError(f"the YAML tag {show(name)}{where} is refused: kdarena reads plain data (numbers, text, "
                             "lists, mappings), never Python objects; remove the tag") from None
        if isinstance(exc, _BadValue):
            raise ValueError(f"YAML value{where}: {problem}; quote it if you mean text") from None
        raise ValueError(f"malformed YAML{where}: {problem}; {fix_syntax}") from None
    except RecursionError:
        raise ValueError("nested too deeply for the YAML reader; a config is a few levels of sections") from None


def load_yaml(path: str | Path) -> Any:
    """Safe YAML from a file holding one document: no Python tags, a clear error for a bad file."""
    docs = load_documents(path)
    if len(docs) > 1:
        raise UserError(f"{path} holds {len(docs)} YAML documents; kdarena reads one per file")
    return docs[0] if docs else None


def load_documents(path: str | Path) -> list[Any]:
    """Every YAML document of a file, safely (no Python tags); a clear error for a bad file."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder; pass the path of a YAML file")
    if not path.is_file():
        raise UserError(f"config file not found: {path}; pass the path of a YAML file (see `kdarena train --help`)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file; pass a YAML config") from None
    except OSError as exc:
        raise UserError(f"cannot read {path} ({exc.strerror or exc}); check the file's permissions") from None
    try:
        return read_yaml_text(text)
    except ValueError as exc:
        raise UserError(f"{path}: {exc}") from None


def apply_overrides(raw: Any, overrides: list[str]) -> Any:
    """`--set a.b.c=value` edits: the value is parsed as YAML (numbers, lists, booleans)."""
    if raw is not None and not isinstance(raw, dict):
        if overrides:
            raise UserError("--set needs a config whose top level is a mapping of sections")
        return raw
    doc = dict(raw or {})
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {show(item)}: expected KEY=VALUE, e.g. --set method.params.alpha=0.5")
        parts = [part.strip() for part in key.strip().split(".")]
        if not all(parts):
            raise UserError(f"--set {show(item)}: an empty name in {show(key)}; write section.field=VALUE, e.g. "
                            "--set train.epochs=5")
        try:
            values = read_yaml_text(value, fix_syntax="quote the value")
        except ValueError as exc:
            raise UserError(f"--set {show(item)}: {exc}") from None
        if len(values) > 1:
            raise UserError(f"--set {show(item)}: the value holds {len(values)} YAML documents; give one value")
        parsed = values[0] if values else None
        node = doc
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise UserError(f"--set {show(item)}: {show(part)} is a value, not a section")
            else:
                child = node[part] = dict(child)
            node = child
        node[parts[-1]] = parsed
    return doc
