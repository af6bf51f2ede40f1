"""``docs/bench_schema.md``, rendered from ``manidp/bench/schema.json``.

    python -m manidp.bench.schema_doc            # rewrite docs/bench_schema.md
    python -m manidp.bench.schema_doc OUT.md     # write it elsewhere

``tests/test_bench.py`` checks that the committed page equals the rendering.
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional, Sequence, Tuple

from .schema import REPORT_SCHEMA, SCHEMA_PATH, type_names

__all__ = ["DOC_PATH", "render_markdown", "main"]

DOC_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(SCHEMA_PATH))), "docs", "bench_schema.md")


def _type_cell(schema: dict) -> str:
    return "/".join(type_names(schema))


def _meaning(schema: dict, optional: bool) -> str:
    text = schema.get("description", "")
    if "enum" in schema:
        text += " (one of " + ", ".join(f"`{v}`" for v in schema["enum"]) + ")"
    return text + (" (optional)" if optional else "")


def _nested(schema: dict) -> Optional[dict]:
    """The object schema a property holds directly or as array items, if it has properties."""
    inner = schema.get("items", schema)
    return inner if "properties" in inner else None


def _table(schema: dict) -> List[str]:
    required = set(schema.get("required", []))
    rows = ["| key | type | meaning |", "|---|---|---|"]
    for key, sub in schema["properties"].items():
        rows.append(f"| `{key}` | {_type_cell(sub)} | {_meaning(sub, key not in required)} |")
    return rows


def _sections(schema: dict, path: str) -> List[Tuple[str, dict]]:
    """``(heading, object schema)`` for ``schema`` and every object nested in it, depth first."""
    out = [(path, schema)]
    for key, sub in schema["properties"].items():
        inner = _nested(sub)
        if inner is not None:
            suffix = "[]" if "items" in sub else ""
            out += _sections(inner, f"{path}.{key}{suffix}" if path else f"{key}{suffix}")
    return out


def render_markdown(schema: Optional[dict] = None) -> str:
    """``docs/bench_schema.md``: the schema's description and one key table per object."""
    schema = schema or REPORT_SCHEMA
    lines = [f"# {schema['title']}", "", "<!-- generated from manidp/bench/schema.json by "
             "`python -m manidp.bench.schema_doc`; edit the schema, not this file -->", ""]
    lines += [schema["description"], ""]
    for path, obj in _sections(schema, ""):
        lines += [f"## {'Top level' if not path else f'`{path}`'}", ""]
        if path:
            lines += [obj["description"][0].upper() + obj["description"][1:] + ".", ""]
        lines += _table(obj) + [""]
        if obj.get("note"):
            lines += [obj["note"], ""]
    for section in schema.get("sections", []):
        lines += [f"## {section['title']}", "", section["text"], ""]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Write the rendered schema to ``OUT`` (default ``docs/bench_schema.md``)."""
    import argparse
    parser = argparse.ArgumentParser(prog="python -m manidp.bench.schema_doc",
                                     description="Render manidp/bench/schema.json as Markdown.")
    parser.add_argument("out", nargs="?", default=DOC_PATH, help="the Markdown file to write")
    path = parser.parse_args(argv).out
    with open(path, "w") as f:
        f.write(render_markdown())
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
