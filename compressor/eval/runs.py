"""`compress report`: every evaluated run in a folder, as a markdown table and an HTML page.

The page is one self-contained file (inline CSS and SVG, no script, nothing fetched) with three
plots: perplexity against stored bits per weight, bits per decoder block of each run, and each
task's recovery (compressed / dense).
"""

from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path

from compressor.errors import CompressorError

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def collect_runs(folder: Path) -> list[dict]:
    """{name, eval, bits_per_block} for FOLDER/eval.json and every FOLDER/*/eval.json."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CompressorError(f"{folder} is not a folder")
    paths = ([folder / "eval.json"] if (folder / "eval.json").is_file() else []) + sorted(
        folder.glob("*/eval.json")
    )
    runs = []
    for path in paths:
        try:
            result = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise CompressorError(f"{path} is not valid JSON: {error}") from error
        # The checkpoint's compress.json sits beside eval.json, or in the evaluated folder when
        # the report was written elsewhere (--report).
        manifests = [path.parent / "compress.json", Path(str(result.get("model", ""))) / "compress.json"]
        manifest = next((m for m in manifests if m.is_file()), None)
        runs.append({"name": path.parent.name, "eval": result, "bits_per_block": _bits_per_block(manifest),
                     "training": _training_curve(manifest)})
    if not runs:
        raise CompressorError(f"no eval.json found in {folder} or its subfolders; run `compress eval` first")
    return runs


def _bits_per_block(manifest_path: Path | None) -> list[float] | None:
    """Mean stored bits per weight of each decoder block's linears (weighted by size)."""
    if manifest_path is None:
        return None
    modules = json.loads(manifest_path.read_text()).get("modules", {})
    blocks: dict[int, list[float]] = {}
    for name, info in modules.items():
        found = re.search(r"layers\.(\d+)\.", name)
        if found and info.get("bpw") is not None and info.get("shape"):
            size = math.prod(info["shape"])
            totals = blocks.setdefault(int(found.group(1)), [0.0, 0.0])
            totals[0] += info["bpw"] * size
            totals[1] += size
    return [blocks[b][0] / blocks[b][1] for b in sorted(blocks)] if blocks else None


def _row(run: dict) -> dict:
    result = run["eval"]
    compression = result.get("compression") or {}
    return {
        "bpw": compression.get("bpw"),
        "method": compression.get("method", "dense"),
        "ppl": (result.get("perplexity") or {}).get("ppl"),
        "kl": (result.get("kl") or {}).get("kl"),
        "recovery": result.get("recovery") or {},
        "tasks": result.get("tasks") or {},
    }


def _task_names(runs: list[dict]) -> list[str]:
    return list(dict.fromkeys(task for run in runs for task in _row(run)["tasks"]))


def render_runs_markdown(runs: list[dict]) -> str:
    tasks = _task_names(runs)
    head = ["run", "method", "bpw", "wt2 ppl", "KL", *[f"{t} (recovery)" for t in tasks]]
    lines = ["# Runs", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fmt = lambda v, d: "n/a" if v is None else f"{v:.{d}f}"  # noqa: E731
    for run in runs:
        row = _row(run)
        cells = [run["name"], str(row["method"]), fmt(row["bpw"], 3), fmt(row["ppl"], 3), fmt(row["kl"], 4)]
        for task in tasks:
            entry = row["tasks"].get(task)
            if entry is None:
                cells.append("")
                continue
            value = entry["metrics"].get(entry["primary"])
            share = row["recovery"].get(task)
            cells.append(f"{fmt(value, 3)} ({fmt(share, 3)})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# -- SVG plots ----------------------------------------------------------------------------------


def _training_curve(manifest_path: Path | None) -> list[tuple[int, float]] | None:
    """(tokens, held-out perplexity) as a `compress distill` run trained, from its compress.json."""
    if manifest_path is None:
        return None
    run = json.loads(manifest_path.read_text()).get("distill") or {}
    curve = [(c["tokens"], c["heldout_ppl"]) for c in run.get("curve", []) if c.get("heldout_ppl")]
    return curve or None


def training_svg(runs: list[dict], width: int = 560, height: int = 300) -> str | None:
    """Held-out perplexity against training tokens, one line per distilled run."""
    lines = [(run["name"], run["training"]) for run in runs if run.get("training")]
    if not lines:
        return None
    tokens = [t for _, curve in lines for t, _ in curve]
    logs = [math.log10(p) for _, curve in lines for _, p in curve]
    x = _scale(0, max(tokens), 60, width - 20)
    y = _scale(min(logs) - 0.02, max(logs) + 0.02, height - 40, 30)
    parts = _axes(width, height, "Distillation: held-out perplexity", "training tokens",
                  "held-out perplexity (log)")
    parts += _y_ticks(min(logs) - 0.02, max(logs) + 0.02, y, lambda v: f"{10**v:.3g}")
    parts += _x_ticks([max(tokens) * i / 4 for i in range(5)], x, lambda v: f"{v / 1e3:.0f}k", height - 40)
    for number, (name, curve) in enumerate(lines):
        color = COLORS[number % len(COLORS)]
        path = " ".join(f"{x(t):.1f},{y(math.log10(p)):.1f}" for t, p in curve)
        parts.append(f'<polyline class="curve" points="{path}" fill="none" stroke="{color}" stroke-width="2">'
                     f"<title>{html.escape(name)}: {curve[0][1]:.2f} -> {curve[-1][1]:.2f}</title>"
                     "</polyline>")
        last_x, last_y = x(curve[-1][0]), y(math.log10(curve[-1][1]))
        parts.append(f'<text x="{last_x - 4:.1f}" y="{last_y - 6:.1f}" font-size="11" text-anchor="end">'
                     f"{html.escape(name)}</text>")
    return "\n".join(parts + ["</svg>"])


def _axes(width: int, height: int, title: str, x_label: str, y_label: str, left: int = 60) -> list[str]:
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" width="{width}" height="{height}" '
        f'role="img" aria-label="{html.escape(title)}">',
        f'<text x="{width / 2}" y="16" text-anchor="middle" font-weight="bold">{html.escape(title)}</text>',
        f'<line x1="{left}" y1="{height - 40}" x2="{width - 20}" y2="{height - 40}" stroke="#333"/>',
        f'<line x1="{left}" y1="30" x2="{left}" y2="{height - 40}" stroke="#333"/>',
        f'<text x="{width / 2}" y="{height - 6}" text-anchor="middle">{html.escape(x_label)}</text>',
        f'<text x="14" y="{height / 2}" transform="rotate(-90 14 {height / 2})" '
        f'text-anchor="middle">{html.escape(y_label)}</text>',
    ]


def _y_ticks(low: float, high: float, to_y, label, left: int = 60, count: int = 5) -> list[str]:
    """Tick marks and labels up the vertical axis at x = left."""
    parts = []
    for step in range(count):
        y = to_y(low + (high - low) * step / (count - 1))
        parts.append(
            f'<line x1="{left - 4}" y1="{y:.1f}" x2="{left}" y2="{y:.1f}" stroke="#333"/>'
            f'<text class="tick" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="10">'
            f"{label(low + (high - low) * step / (count - 1))}</text>"
        )
    return parts


def _x_ticks(values: list[float], to_x, label, baseline: float) -> list[str]:
    """Tick labels under the horizontal axis at y = baseline."""
    return [
        f'<text class="tick" x="{to_x(v):.1f}" y="{baseline + 14:.1f}" text-anchor="middle" '
        f'font-size="10">{label(v)}</text>'
        for v in values
    ]


def _scale(low: float, high: float, start: float, end: float):
    span = (high - low) or 1.0
    return lambda v: start + (v - low) / span * (end - start)


def ppl_vs_bpw_svg(runs: list[dict], width: int = 560, height: int = 340) -> str | None:
    points = [(run["name"], _row(run)["bpw"] or 16.0, _row(run)["ppl"]) for run in runs]
    points = [(n, b, p) for n, b, p in points if p]
    if not points:
        return None
    logs = [math.log10(p) for _, _, p in points]
    x = _scale(min(b for _, b, _ in points) - 0.25, max(b for _, b, _ in points) + 0.25, 60, width - 20)
    y = _scale(min(logs) - 0.05, max(logs) + 0.05, height - 40, 30)
    parts = _axes(
        width,
        height,
        "Perplexity vs stored bits per weight",
        "stored bits per weight (dense = 16)",
        "WikiText-2 perplexity (log)",
    )
    low_bpw, high_bpw = min(b for _, b, _ in points) - 0.25, max(b for _, b, _ in points) + 0.25
    parts += _y_ticks(min(logs) - 0.05, max(logs) + 0.05, y, lambda v: f"{10**v:.3g}")
    parts += _x_ticks(
        [low_bpw + (high_bpw - low_bpw) * i / 4 for i in range(5)], x, lambda v: f"{v:.2f}", height - 40
    )
    for number, (name, bpw, ppl) in enumerate(points):
        cx, cy = x(bpw), y(math.log10(ppl))
        color = COLORS[number % len(COLORS)]
        parts.append(
            f'<circle class="point" cx="{cx:.1f}" cy="{cy:.1f}" r="5" fill="{color}">'
            f"<title>{html.escape(name)}: {ppl:.3f} at {bpw:.3f} bpw</title></circle>"
        )
        parts.append(
            f'<text x="{cx + 7:.1f}" y="{cy - 6:.1f}" font-size="11">{html.escape(name)} ({ppl:.1f})</text>'
        )
    return "\n".join(parts + ["</svg>"])


def bits_per_block_svg(runs: list[dict], width: int = 560, height: int = 300) -> str | None:
    # Quantized runs only: a pruned run stores its weights at 16/32 bits and would flatten the rest.
    series = [(run["name"], bits) for run in runs if (bits := run.get("bits_per_block")) and max(bits) < 16]
    if not series:
        return None
    blocks = max(len(bits) for _, bits in series)
    top = max(max(bits) for _, bits in series)
    x = _scale(0, max(blocks - 1, 1), 70, width - 30)
    y = _scale(0, top + 0.5, height - 40, 30)
    parts = _axes(
        width,
        height,
        "Stored bits per weight of each decoder block (quantized runs)",
        "decoder block",
        "bits per weight",
    )
    parts += _y_ticks(0, top + 0.5, y, lambda v: f"{v:.1f}")
    parts += _x_ticks(sorted({0, (blocks - 1) // 2, blocks - 1}), x, str, height - 40)
    for number, (name, bits) in enumerate(series):
        color = COLORS[number % len(COLORS)]
        path = " ".join(f"{x(i):.1f},{y(b):.1f}" for i, b in enumerate(bits))
        parts.append(
            f'<polyline class="series" fill="none" stroke="{color}" stroke-width="2" points="{path}">'
            f"<title>{html.escape(name)}</title></polyline>"
        )
        parts.append(
            f'<text x="{width - 150}" y="{40 + 14 * number}" fill="{color}" font-size="11">'
            f"{html.escape(name)}</text>"
        )
    return "\n".join(parts + ["</svg>"])


def recovery_svg(runs: list[dict], width: int = 560) -> str | None:
    bars = [(run["name"], task, share) for run in runs for task, share in _row(run)["recovery"].items()]
    if not bars:
        return None
    height = 80 + 18 * len(bars)
    x = _scale(0, max(1.1, max(s for _, _, s in bars)), 230, width - 40)
    parts = _axes(
        width,
        height,
        "Recovery: compressed / dense (perplexity: dense / compressed)",
        "recovery",
        "",
        left=230,
    )
    parts += _x_ticks([0.0, 0.5, 1.0], x, lambda v: f"{v:.1f}", height - 40)
    parts.append(
        f'<line x1="{x(1.0):.1f}" y1="30" x2="{x(1.0):.1f}" y2="{height - 40}" stroke="#999" '
        'stroke-dasharray="4 3"/>'
    )
    names = list(dict.fromkeys(name for name, _, _ in bars))
    for number, (name, task, share) in enumerate(bars):
        top = 30 + 18 * number
        color = COLORS[names.index(name) % len(COLORS)]
        parts.append(
            f'<rect class="bar" x="{x(0):.1f}" y="{top}" width="{x(share) - x(0):.1f}" height="14" '
            f'fill="{color}"><title>{html.escape(name)} {task}: {share:.3f}</title></rect>'
        )
        parts.append(
            f'<text x="225" y="{top + 11}" text-anchor="end" font-size="11">'
            f"{html.escape(name)} · {html.escape(task)}</text>"
        )
        parts.append(f'<text x="{x(share) + 4:.1f}" y="{top + 11}" font-size="11">{share:.3f}</text>')
    return "\n".join(parts + ["</svg>"])


def _markdown_table_html(markdown: str) -> str:
    rows = [line for line in markdown.splitlines() if line.startswith("|") and not line.startswith("|---")]
    cells = [[html.escape(c.strip()) for c in row.strip("|").split("|")] for row in rows]
    if not cells:
        return ""
    head = "".join(f"<th>{c}</th>" for c in cells[0])
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in cells[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_runs_html(runs: list[dict]) -> str:
    plots = [svg for svg in (ppl_vs_bpw_svg(runs), bits_per_block_svg(runs), recovery_svg(runs),
                             training_svg(runs)) if svg]
    style = (
        "body{font-family:sans-serif;margin:2em;color:#222} table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right} th{background:#f3f3f3}"
        "td:first-child,th:first-child{text-align:left} svg{margin:1em 1em 0 0;font-family:sans-serif;"
        "font-size:12px;background:#fff;vertical-align:top}"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>compressor runs</title>'
        f"<style>{style}</style></head><body>\n<h1>Compressed runs</h1>\n"
        f"{_markdown_table_html(render_runs_markdown(runs))}\n<h2>Plots</h2>\n<div>"
        + "\n".join(plots)
        + "</div>\n</body></html>\n"
    )
