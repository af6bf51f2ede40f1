"""The report schema: ``schema.json`` read, and reports checked against it.

``schema.json`` (beside this module) is the one definition of the report format,
in a subset of JSON Schema: ``type`` (a name or a list of names), ``properties``,
``required``, ``enum`` and ``items``, plus a ``description`` for every key
(:mod:`manidp.bench.schema_doc` renders those as ``docs/bench_schema.md``).
"""

from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence

__all__ = ["SCHEMA_PATH", "REPORT_SCHEMA", "SCHEMA_VERSION", "load_schema", "type_names", "validate_report"]

SCHEMA_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "schema.json")

_PY_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list,
             "object": dict, "null": type(None)}


def load_schema(path: str = SCHEMA_PATH) -> dict:
    """The schema as a dict."""
    with open(path) as f:
        return json.load(f)


REPORT_SCHEMA = load_schema()
SCHEMA_VERSION = REPORT_SCHEMA["properties"]["schema"]["enum"][0]


# ---------------------------------------------------------------------------- validation
def type_names(schema: dict) -> List[str]:
    t = schema.get("type", "object")
    return [t] if isinstance(t, str) else list(t)


def _has_type(value, types: Sequence[str]) -> bool:
    """JSON type check; booleans are not numbers."""
    for t in types:
        if isinstance(value, bool) and t in ("integer", "number"):
            continue
        if isinstance(value, _PY_TYPES[t]):
            return True
    return False


def _validate(value, schema: dict, where: str, errors: List[str]) -> None:
    types = type_names(schema)
    if not _has_type(value, types):
        errors.append(f"{where}: expected {'/'.join(types)}, got {type(value).__name__}")
        return
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} not in {schema['enum']}")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{where}: missing key {key!r}")
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                _validate(value[key], sub, f"{where}.{key}", errors)
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            _validate(item, schema["items"], f"{where}[{i}]", errors)


def _timing_problems(report: dict) -> List[str]:
    """``ok`` results must carry their timings (a rule JSON types cannot express)."""
    errors = []
    methods = report.get("methods") if isinstance(report.get("methods"), list) else []
    for m in methods:
        for r in m.get("results", []) if isinstance(m, dict) else []:
            if isinstance(r, dict) and r.get("status") == "ok":
                if not r.get("times_ms") or r.get("median_ms") is None or len(r["times_ms"]) != r.get("iters"):
                    errors.append(f"method {m.get('name')!r} batch {r.get('batch_size')}: ok without timings")
    return errors


def validate_report(report: dict, schema: Optional[dict] = None) -> List[str]:
    """Problems of ``report`` against the schema (empty list: valid)."""
    errors: List[str] = []
    _validate(report, schema or REPORT_SCHEMA, "report", errors)
    return errors + _timing_problems(report)
