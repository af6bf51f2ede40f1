"""The report: speedups and summary, ``report.json`` / ``report.md`` / ``report.png``, the terminal table.

The JSON format is ``schema.json`` (rendered in ``docs/bench_schema.md``); every
report is validated against it before it is written.
"""

from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .schema import SCHEMA_VERSION, validate_report

__all__ = ["COLUMNS", "summarize", "build_report", "write_reports", "print_report", "table_rows", "format_table",
           "summary_lines", "write_markdown", "write_plot"]

COLUMNS = ("method", "batch", "median ms", "p90 ms", "img/s", "vs best dense")
PLOT_STYLES = {"dense": "-", "masked": ":", "gated": "-", "static": "--"}


# ---------------------------------------------------------------------------- speedups and summary
def _fastest(entries: Sequence[dict], kind: str, bs: int) -> Optional[Tuple[str, dict]]:
    """(name, result) of the fastest ``kind`` method timed at batch size ``bs``, or None."""
    ok = [(m["name"], r) for m in entries if m["kind"] == kind for r in m["results"]
          if r["batch_size"] == bs and r["status"] == "ok"]
    return min(ok, key=lambda t: t[1]["median_ms"]) if ok else None


def _set_speedups(entries: Sequence[dict], bs: int, best_dense_ms: Optional[float]) -> None:
    for m in entries:
        for r in m["results"]:
            if r["batch_size"] == bs and r["status"] == "ok" and best_dense_ms:
                r["speedup_vs_best_dense"] = best_dense_ms / r["median_ms"]


def _summary_row(entries: Sequence[dict], bs: int, ideal: float) -> dict:
    best_dense = _fastest(entries, "dense", bs)
    bd_ms = best_dense[1]["median_ms"] if best_dense else None
    _set_speedups(entries, bs, bd_ms)
    best_gated, best_static = _fastest(entries, "gated", bs), _fastest(entries, "static", bs)
    gated_speedup = best_gated[1]["speedup_vs_best_dense"] if best_gated else None
    return {"batch_size": bs, "best_dense": best_dense[0] if best_dense else None, "best_dense_median_ms": bd_ms,
            "ideal_speedup": ideal, "ideal_ms": bd_ms / ideal if bd_ms else None,
            "best_gated": best_gated[0] if best_gated else None,
            "best_gated_median_ms": best_gated[1]["median_ms"] if best_gated else None,
            "best_gated_speedup": gated_speedup,
            "realized_over_ideal": gated_speedup / ideal if gated_speedup else None,
            "static_speedup": best_static[1]["speedup_vs_best_dense"] if best_static else None}


def summarize(entries: Sequence[dict], macs: dict) -> List[dict]:
    """The ``summary`` rows, one per batch size; sets every result's ``speedup_vs_best_dense``."""
    return [_summary_row(entries, row["batch_size"], row["ideal_speedup"]) for row in macs["per_batch_size"]]


def build_report(environment: dict, config: dict, model: dict, data: dict, macs: dict, static: dict,
                 entries: List[dict]) -> dict:
    """The whole report, summary computed; RuntimeError if it does not match the schema (a bug here)."""
    summary = summarize(entries, macs)
    report = {"schema": SCHEMA_VERSION, "environment": environment, "config": config, "model": model,
              "data": data, "macs": macs, "static": static, "methods": entries, "summary": summary}
    problems = validate_report(report)
    if problems:
        raise RuntimeError(f"report does not match its schema: {problems[:5]}")
    return report


# ---------------------------------------------------------------------------- table
def _fmt(v, spec: str, suffix: str = "") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec) + suffix


def _result_row(name: str, r: dict) -> List[str]:
    if r["status"] != "ok":
        return [name, str(r["batch_size"]), r["status"], "", "", ""]
    return [name, str(r["batch_size"]), _fmt(r["median_ms"], ".3f"), _fmt(r["p90_ms"], ".3f"),
            _fmt(r["throughput_ips"], ".1f"), _fmt(r["speedup_vs_best_dense"], ".2f", "x")]


def _ideal_row(s: dict) -> List[str]:
    bs = s["batch_size"]
    return ["ideal", str(bs), _fmt(s["ideal_ms"], ".3f"), "", _fmt(bs / (s["ideal_ms"] / 1e3), ".1f"),
            _fmt(s["ideal_speedup"], ".2f", "x")]


def table_rows(report: dict) -> List[List[str]]:
    """The rows of the terminal / markdown table (strings), batch size by batch size."""
    rows = []
    summary = {s["batch_size"]: s for s in report["summary"]}
    for bs in report["config"]["batch_sizes"]:
        rows += [_result_row(m["name"], r) for m in report["methods"] for r in m["results"] if r["batch_size"] == bs]
        s = summary.get(bs)
        if s is not None and s["ideal_ms"] is not None:
            rows.append(_ideal_row(s))
    return rows


def format_table(report: dict) -> str:
    """The table as aligned text, a blank line between batch sizes."""
    rows = table_rows(report)
    widths = [max([len(COLUMNS[i])] + [len(r[i]) for r in rows]) for i in range(len(COLUMNS))]

    def line(cells):
        return "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(cells))
    out = [line(COLUMNS), line(["-" * w for w in widths])]
    for i, r in enumerate(rows):
        if i and r[1] != rows[i - 1][1]:
            out.append("")
        out.append(line(r))
    return "\n".join(out)


def summary_lines(report: dict) -> List[str]:
    """One line per batch size: MACs, ideal speedup, best gated and static speedups."""
    lines = []
    dense = report["macs"]["dense"]
    for s, mb in zip(report["summary"], report["macs"]["per_batch_size"]):
        txt = (f"batch {s['batch_size']}: dense {dense / 1e6:.2f} MMAC, dynamic {mb['mean_dynamic'] / 1e6:.2f} MMAC "
               f"({mb['fraction']:.3f}), ideal {s['ideal_speedup']:.2f}x")
        if s["best_gated"] is not None:
            txt += (f"; best gated {s['best_gated']} {s['best_gated_speedup']:.2f}x vs {s['best_dense']} "
                    f"({s['realized_over_ideal']:.2f} of ideal)")
        if s["static_speedup"] is not None:
            txt += f"; static {s['static_speedup']:.2f}x"
        lines.append(txt)
    return lines


# ---------------------------------------------------------------------------- markdown
def _fmt_load(load) -> str:
    return "unknown" if not load else " / ".join(f"{v:.2f}" for v in load) + " (1 / 5 / 15 min)"


def _markdown_header(report: dict) -> List[str]:
    env, cfg, st = report["environment"], report["config"], report["static"]
    return ["# manidp-bench report", "",
            f"- command: `{env['command_line']}`",
            f"- date: {env['date']}; git commit: {env['git_commit'] or 'unknown'}"
            f"{' (dirty)' if env['git_dirty'] else ''}",
            f"- device: {env['device']} ({env['device_name'] or 'unknown'}); CPU: {env['cpu_model'] or 'unknown'}, "
            f"{env['cpu_threads']} threads of {env['cpu_count']} cores",
            f"- load average at start: {_fmt_load(env['load_average'])}",
            f"- torch {env['torch']}, CUDA {env['torch_cuda'] or '-'}, Triton {env['triton'] or '-'}, "
            f"ONNX Runtime {env['onnxruntime'] or 'not installed'}, OpenVINO {env['openvino'] or 'not installed'}, "
            f"Python {env['python']}",
            f"- isolation: {env['runtime_isolation']}",
            f"- model: {cfg['model']} ({cfg['model_source']}, {cfg['arch']}, input {cfg['input_size'][0]}x"
            f"{cfg['input_size'][1]}x{cfg['in_channels']}), dtype {cfg['dtype']}",
            f"- data: {report['data']['name']} ({report['data']['note']})",
            f"- dense MACs {report['macs']['dense'] / 1e6:.2f} M; mean dynamic fraction "
            f"{report['macs']['overall_mean_fraction']:.3f}; static narrow network: keep "
            f"{_fmt(st['keep'], '.3f')}, {st['fraction']:.3f} of dense MACs ({st['sized_from']})",
            f"- timing: {cfg['warmup']} warm-up, up to {cfg['iters']} iterations or {cfg['time_budget_s']} s per "
            f"measurement, {cfg['num_batches']} rotated input batches; {cfg['rounds']} round(s), the first in "
            f"{cfg['method_order']} order, later ones alternating; each row is its batch size's best round",
            "- best dense: the fastest `dense` method of each batch size, whatever runs it"]


def _markdown_notes(report: dict) -> List[str]:
    """Why methods were skipped or failed."""
    notes = [m for m in report["methods"] if m["status"] != "ok" or any(r["status"] != "ok" for r in m["results"])]
    if not notes:
        return []
    lines = ["", "## Skipped or failed", ""]
    for m in notes:
        reasons = {r["reason"] for r in m["results"] if r["reason"]} | ({m["reason"]} if m["reason"] else set())
        lines.append(f"- {m['name']} ({m['status']}): {'; '.join(sorted(reasons))}")
    return lines


def write_markdown(report: dict, path: str) -> None:
    """``report.md``: environment, the table, summary, skipped methods, method descriptions, the plot."""
    lines = _markdown_header(report)
    lines += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(report)]
    lines += ["", "## Summary", ""] + [f"- {s}" for s in summary_lines(report)]
    lines += _markdown_notes(report)
    lines += ["", "## Methods", ""] + [f"- `{m['name']}`: {m['description']}" for m in report["methods"]]
    lines += ["", "![throughput and speedup](report.png)", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


# ---------------------------------------------------------------------------- plot
def _plot_throughput(ax, report: dict) -> None:
    import matplotlib.ticker
    bss = report["config"]["batch_sizes"]
    for m in report["methods"]:
        pts = [(r["batch_size"], r["throughput_ips"]) for r in m["results"] if r["status"] == "ok"]
        if pts:
            ax.plot(*zip(*pts), PLOT_STYLES.get(m["kind"], "-"), marker="o", label=m["name"],
                    linewidth=2.2 if m["kind"] == "gated" else 1.2)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(bss)
    ax.set_xticklabels([str(b) for b in bss])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("batch size")
    ax.set_ylabel("throughput (images/s)")
    ax.set_title(f"{report['config']['arch']} on {report['environment']['device']}, {report['config']['dtype']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def _speedups_at(m: dict, bss: Sequence[int]) -> List[float]:
    by_bs = {r["batch_size"]: r for r in m["results"]}
    return [by_bs[b]["speedup_vs_best_dense"] if b in by_bs and by_bs[b]["status"] == "ok"
            and by_bs[b]["speedup_vs_best_dense"] is not None else 0.0 for b in bss]


def _plot_speedups(ax, report: dict) -> None:
    bss = report["config"]["batch_sizes"]
    series = [m for m in report["methods"] if m["kind"] in ("gated", "masked", "static")
              and any(r["status"] == "ok" for r in m["results"])]
    width = 0.8 / (len(series) + 1)
    xs = np.arange(len(bss))
    for i, m in enumerate(series):
        ax.bar(xs + i * width, _speedups_at(m, bss), width, label=m["name"])
    ideal = [s["ideal_speedup"] for s in report["summary"]]
    ax.bar(xs + len(series) * width, ideal, width, label="ideal (MACs)", color="none", edgecolor="black", hatch="//")
    ax.axhline(1.0, color="gray", linewidth=1)
    ax.set_xticks(xs + width * len(series) / 2)
    ax.set_xticklabels([str(b) for b in bss])
    ax.set_xlabel("batch size")
    ax.set_ylabel("speedup over best dense")
    ax.set_title("realized vs ideal speedup")
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)


def write_plot(report: dict, path: str) -> None:
    """``report.png``: throughput per method against batch size; realized and ideal speedups."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    _plot_throughput(ax1, report)
    _plot_speedups(ax2, report)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- files and terminal
def write_json_and_markdown(report: dict, markdown: str, stem: str) -> Tuple[str, str]:
    """``STEM.json`` (``report``) and ``STEM.md`` (``markdown``), creating the directory; returns both paths."""
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown)
    return stem + ".json", stem + ".md"


def write_reports(report: dict, out_dir: str) -> Dict[str, str]:
    """``report.json``, ``report.md`` and ``report.png`` in ``out_dir``; returns their paths."""
    paths = {k: os.path.join(out_dir, f"report.{k}") for k in ("json", "md", "png")}
    with open(paths["json"], "w") as f:
        json.dump(report, f, indent=1)
    write_markdown(report, paths["md"])
    write_plot(report, paths["png"])
    return paths


def print_report(report: dict, paths: Dict[str, str]) -> None:
    """The table, the summary lines, what did not run, and where the files are."""
    print(format_table(report))
    print()
    for line in summary_lines(report):
        print(line)
    for m in report["methods"]:
        if m["status"] != "ok":
            print(f"{m['name']}: {m['status']} ({m['reason']})")
    print(f"\nreports: {paths['json']}, {paths['md']}, {paths['png']}")
