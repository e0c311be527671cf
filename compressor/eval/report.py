"""Render the JSON written by `compress eval` as a human-readable markdown report."""

from __future__ import annotations


def _fmt(value, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ratio(compressed, dense) -> str:
    if compressed is None or not dense:
        return "n/a"
    return f"{compressed / dense:.3f}x"


def _protocol(label: str, ppl: dict) -> str:
    # A perplexity is only comparable with another measured the same way, so always state how.
    dataset = ppl.get("dataset", "?")
    return (
        f"- {label} perplexity protocol: dataset {dataset}, seqlen {ppl.get('seqlen')}, "
        f"windows {ppl.get('windows')}, tokens {ppl.get('tokens')}, stride {ppl.get('stride')}"
    )


def _compression_lines(compression: dict) -> list[str]:
    labels = [
        ("method", "method"),
        ("format", "format"),
        ("bits", "bits"),
        ("activations", "activations"),
        ("group_size", "group size"),
        ("symmetric", "symmetric"),
        ("bpw", "stored bits per weight"),
        ("code_bits", "code bits per weight"),
        ("allocation", "allocation"),
        ("search", "search"),
        ("size_mb", "size (MB)"),
    ]
    return [f"- {label}: {compression[key]}" for key, label in labels if key in compression]


def _metrics_table(ppl: dict | None, base: dict | None) -> list[str]:
    ppl = ppl or {}
    base = base or {}
    rows = [
        ("perplexity", ppl.get("ppl"), base.get("ppl"), 3),
        ("mean NLL", ppl.get("nll"), base.get("nll"), 4),
    ]
    lines = ["| metric | compressed | dense | ratio |", "|---|---|---|---|"]
    for name, mine, dense, digits in rows:
        if mine is None and dense is None:
            continue
        lines.append(
            f"| {name} | {_fmt(mine, digits)} | {_fmt(dense, digits)} | {_ratio(mine, dense)} |"
        )
    return lines


def _kl_lines(kl: dict) -> list[str]:
    agreement = kl.get("top1_agreement")
    agreement_text = "n/a" if agreement is None else f"{100 * agreement:.1f}%"
    return [
        f"- KL(dense || compressed): {_fmt(kl.get('kl'), 4)} nats/token",
        f"- top-1 agreement: {agreement_text}",
        f"- KL protocol: dataset {kl.get('dataset', '?')}, seqlen {kl.get('seqlen')}, "
        f"windows {kl.get('windows')}, tokens {kl.get('tokens')}",
    ]


def _environment_line(env: dict) -> str:
    return "- " + ", ".join(f"{key} {value}" for key, value in env.items())


def _task_metrics(entry: dict) -> str:
    parts = []
    for name, value in entry["metrics"].items():
        if value is None:
            continue
        error = (entry.get("stderr") or {}).get(name)
        parts.append(f"{name} {value:.4f}" + (f" ± {error:.4f}" if error else ""))
    return ", ".join(parts)


def task_lines(tasks: dict, recovery: dict) -> list[str]:
    """One row per task: compressed and dense scores, recovery on the primary metric, wall time."""
    lines = ["| task | n | compressed | dense | recovery | seconds (compressed / dense) |",
             "|---|---|---|---|---|---|"]
    notes = []
    for task, entry in tasks.items():
        dense = entry.get("dense") or {}
        dense_text = _task_metrics(dense) if dense else "n/a"
        share = recovery.get(task)
        lines.append(f"| {task} | {entry['samples']} | {_task_metrics(entry)} | {dense_text} | "
                     f"{'n/a' if share is None else f'{share:.3f}'} ({entry['primary']}) | "
                     f"{entry['seconds']:.0f} / {dense.get('seconds', 0):.0f} |")
        if entry.get("mmlu"):
            notes.append(f"- {task} by category: " + ", ".join(
                f"{cat} {acc:.3f}" for cat, acc in entry["mmlu"]["categories"].items()))
        if entry.get("chance") is not None:
            notes.append(f"- {task}: chance accuracy {entry['chance']:.2f}")
        judged = entry.get("judge")
        if judged:
            notes.append(f"- {task} judge ({judged['model']}): compressed "
                         f"{_fmt((judged.get('compressed') or {}).get('score'), 2)}, dense "
                         f"{_fmt((judged.get('dense') or {}).get('score'), 2)} out of 10")
        if entry.get("chat_template"):
            notes.append(f"- {task}: prompts wrapped in the model's chat template")
    return lines + ([""] + notes if notes else [])


def render_markdown(result: dict) -> str:
    """Markdown for one eval result; sections whose data is missing or null are left out."""
    ppl = result.get("perplexity")
    base = result.get("baseline_perplexity")
    lines = [f"# Evaluation: {result.get('model', 'model')}", ""]
    if result.get("baseline"):
        lines += [f"Dense baseline: {result['baseline']}", ""]
    if result.get("compression"):
        lines += ["## Compression", *_compression_lines(result["compression"]), ""]
    if ppl or base:
        lines += ["## Quality", *_metrics_table(ppl, base), ""]
        if ppl:
            lines.append(_protocol("compressed", ppl))
        if base:
            lines.append(_protocol("dense", base))
        lines.append("")
    if result.get("kl"):
        lines += ["## Divergence from dense", *_kl_lines(result["kl"]), ""]
    if result.get("tasks"):
        lines += ["## Tasks", *task_lines(result["tasks"], result.get("recovery", {})), ""]
    if result.get("environment"):
        lines += ["## Environment", _environment_line(result["environment"])]
        if result.get("seconds") is not None:
            lines.append(f"- wall time: {result['seconds']:.1f} s")
        lines.append("")
    elif result.get("seconds") is not None:
        lines += [f"Wall time: {result['seconds']:.1f} s", ""]
    return "\n".join(lines).rstrip() + "\n"
