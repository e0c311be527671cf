"""`make bench`: the tables of REFERENCE.md's protocol, measured with this tool.

Protocol: SmolLM2-135M-Instruct dequantized to fp32 (bench/prepare.py); calibration 128 x 512
tokens of the C4 slice (seed 0); WikiText-2 test perplexity over the first 32 windows of 2048 tokens;
KL to the dense model on 16 x 512 held-out tokens; 2 threads. Each row runs `compress ...` and
`compress eval` as separate processes, so peak RSS is the row's own; the compression time is the
pipeline step alone (model loading and evaluation excluded), as in REFERENCE.md. All compression
runs of a suite go first, back to back, so their timings share the same quiet machine.

    python bench/run.py quantize                 # one suite
    python bench/run.py sparsity --only wanda-2of4 wanda-2of4-dsnot
    python bench/run.py fp4
    python bench/run.py infer                    # packed inference speed and memory (bench-infer)
    python bench/run.py tasks                    # knowledge / zero-shot tasks, compressed vs dense
    python bench/run.py scale                    # a 1.1B model streamed: peak RSS, kill + resume
    python bench/run.py deploy                   # which layouts vLLM serves (its own venv), NLL gap
    python bench/run.py gguf                     # GPTQ onto GGUF block types vs llama.cpp's quantizer
    python bench/run.py distill                  # students trained against the dense teacher
    python bench/run.py all
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

from deploy import run_deploy, run_gguf  # noqa: E402
from prepare import prepare  # noqa: E402
from scale import run_scale  # noqa: E402

CALIBRATION = ["--calibration", "c4", "--samples", "128", "--seqlen", "512", "--seed", "0", "--device", "cpu"]


def _quant(method: str, bits: int, group: int | str, symmetric: bool) -> list[str]:
    return ["quantize", "--method", method, "--bits", str(bits), "--group-size", str(group),
            "--sym" if symmetric else "--asym"]


def _prune(method: str, pattern: str, dsnot: bool) -> list[str]:
    shape = ["--pattern", pattern] if ":" in pattern else ["--sparsity", pattern]
    return ["sparsify", "--method", method, *shape, "--dsnot" if dsnot else "--no-dsnot"]


def _allocate(score: str, target: str) -> list[str]:
    return ["quantize", "--method", "gptq", "--group-size", "128", "--asym", "--allocate", score,
            "--budget", target]


def _search(target: str) -> list[str]:
    # GPTQ g128 asym at 2..6 bits, calibrated on the LIM allocation's activations at the budget
    # (the default --database-reference): one database per budget.
    return ["search", "--budget", target, "--group-size", "128", "--asym", "--bits-levels", "2,3,4,5,6",
            "--database", str(WORK / f"search-database-{target}")]


def _sparsity_search(target: float) -> list[str]:
    # SparseGPT levels from ~90% down to dense in steps of ~10%, calibrated on the LIM allocation's
    # activations at the target (+-10% by importance): one database per target.
    return ["search", "--budget", f"{target}sparsity", "--levels", "sparsity",
            "--database", str(WORK / f"search-sparsity-database-{target}")]


SUITES: dict[str, list[tuple[str, list[str]]]] = {
    "quantize": [
        ("rtn-w4g64-sym", _quant("rtn", 4, 64, True)),
        ("gptq-w4g64-sym", _quant("gptq", 4, 64, True)),
        ("gptq-w4g64-asym", _quant("gptq", 4, 64, False)),
        ("rtn-w3g64-sym", _quant("rtn", 3, 64, True)),
        ("gptq-w3g64-sym", _quant("gptq", 3, 64, True)),
        ("gptq-w3g64-asym", _quant("gptq", 3, 64, False)),
        ("rtn-w4ch-sym", _quant("rtn", 4, 0, True)),
        ("gptq-w4ch-sym", _quant("gptq", 4, 0, True)),
        ("rtn-w4g128-sym", _quant("rtn", 4, 128, True)),
        ("gptq-w4g128-sym", _quant("gptq", 4, 128, True)),
        ("gptq-w2g64-asym", _quant("gptq", 2, 64, False)),
        # The token embedding as int8 rows in the file (issue 21: <= 100 MiB, within 1% of the row above).
        ("gptq-w4g64-sym-e8", [*_quant("gptq", 4, 64, True), "--embeddings", "int8"]),
        # Issue 22: FineQuant's group size per matrix (vs the g128 / g64 / per-channel rows above), and
        # GPTQ calibrated on text the model writes itself instead of C4 (goal: within 3% of gptq-w4g64-sym).
        ("rtn-w4gauto-sym", _quant("rtn", 4, "auto", True)),
        ("gptq-w4gauto-sym", _quant("gptq", 4, "auto", True)),
        ("gptq-w4g64-sym-selfcal", [*_quant("gptq", 4, 64, True), "--calibration", "self"]),
        # Learned per-row tables (issue 22: better than gptq-w4g64-asym at no more stored bits), the
        # data-free variant, and the fixed-table relative (llama.cpp's IQ4_NL through GPTQ). NF4: fp4.md.
        ("gptq-lut4g64", ["quantize", "--format", "lut4", "--group-size", "64"]),
        ("gptq-lut4g128", ["quantize", "--format", "lut4", "--group-size", "128"]),
        ("gptq-lut4g64-rec", ["quantize", "--format", "lut4", "--group-size", "64", "--reconstruct"]),
        ("gptq-lut4g64-rec-rounding", ["quantize", "--format", "lut4", "--group-size", "64", "--reconstruct",
                                       "--reconstruct-train", "rounding"]),
        ("gptq-lut4g64-rec-full", ["quantize", "--format", "lut4", "--group-size", "64", "--reconstruct",
                                   "--reconstruct-train", "full"]),
        ("rtn-lut4g128", ["quantize", "--format", "lut4", "--method", "rtn", "--group-size", "128"]),
        ("gptq-iq4nl", ["run", str(HERE / "iq4nl-gptq.yaml")]),
        # PTQ1.61 (issue 22: below 300 at <= 1.7 stored bpw; vs gptq-w2g64-asym above): 19% salient
        # channels (1.682 bpw here; the default 20% costs 1.712: SmolLM2's rows are only 576 wide).
        ("ptq161-s19", ["run", str(HERE / "ptq161-s19.yaml")]),
        ("ptq161-s19-scales", ["run", str(HERE / "ptq161-s19-scales.yaml")]),  # signs and codes fixed
        ("ptq161-s19-full", ["run", str(HERE / "ptq161-s19-full.yaml")]),  # signs and codes by Adam
    ],
    "sparsity": [
        (f"{method}-{pattern.replace(':', 'of')}{'-dsnot' if dsnot else ''}", _prune(method, pattern, dsnot))
        for pattern in ("2:4", "4:8", "0.5", "0.6")
        for method in ("magnitude", "wanda", "sparsegpt")
        for dsnot in (False, True)
    ] + [("2of4-w4-recipe", ["run", str(HERE.parent / "recipes" / "2of4-w4.yaml")])],
    # Mixed precision at equal stored bits per weight: GPTQ g128 asymmetric levels throughout.
    "search": [
        ("gptq-w3g128-asym", _quant("gptq", 3, 128, False)),
        ("gptq-w4g128-asym", _quant("gptq", 4, 128, False)),
        ("gptq-w2g128-asym", _quant("gptq", 2, 128, False)),
        *[(f"{score}-{target}", _allocate(score, target)) for target in ("3.5bpw", "2.5bpw")
          for score in ("lim", "zd", "ip")],
        ("evopress-3.5bpw", _search("3.5bpw")),
        ("evopress-2.5bpw", _search("2.5bpw")),
        # The same search scored in float32 (the default is bfloat16): quality and time of each.
        ("evopress-3.5bpw-fp32-fitness", [*_search("3.5bpw"), "--fitness-dtype", "float32"]),
    ],
    # Learned PTQ (issue 19): each layout as plain GPTQ, with the rotation folded in first, with
    # block-wise reconstruction after, and both.
    "learned": [
        (f"gptq-{label}{suffix}", [*_quant("gptq", bits, group, symmetric), *grid_flags, *extra])
        for label, bits, group, symmetric, grid_flags in (
            ("w4g64-sym", 4, 64, True, []), ("w3g64-asym", 3, 64, False, []),
            ("w4g64-asym", 4, 64, False, []), ("w2g64-asym", 2, 64, False, []),
            ("w4g128-sym", 4, 128, True, []),
            # AutoRound's symmetric grid: every code, a signed scale (its 24.88 is on this grid).
            ("w4g64-full", 4, 64, True, ["--full-range"]))
        for suffix, extra in (("", []), ("-rot", ["--rotate"]), ("-rec", ["--reconstruct"]),
                              ("-rot-rec", ["--rotate", "--reconstruct"]), ("-awq", ["--awq"]),
                              ("-rot-awq", ["--rotate", "--awq"]),
                              # each group's range searched for the least (input-weighted) rounding error
                              ("-rot-mse", ["--rotate", "--mse"]),
                              ("-rot-awq-mse", ["--rotate", "--awq", "--mse"]),
                              ("-rot-mse-rec", ["--rotate", "--mse", "--reconstruct"]))
    ] + [(f"{fmt}-gptq{suffix}", ["quantize", "--format", fmt, "--method", "gptq", *extra])
         for fmt in ("nvfp4", "mxfp4")
         for suffix, extra in (("-rot", ["--rotate"]), ("-rec", ["--reconstruct"]),
                               ("-rot-rec", ["--rotate", "--reconstruct"]))
    ] + [(f"sparsegpt-{pattern.replace(':', 'of')}-rec{suffix}",
          [*_prune("sparsegpt", pattern, False), "--reconstruct", *extra])
         for pattern in ("2:4", "0.5")
         # 50 steps (the rows made first, before sparsify's default became 200: -iters200)
         for suffix, extra in (("", ["--reconstruct-iters", "50"]),
                               ("-iters100", ["--reconstruct-iters", "100"]),
                               ("-iters200", ["--reconstruct-iters", "200"]))
    ] + [(f"gptq-{label}-rot-rec-init", ["run", str(HERE / recipe)])
         for label, recipe in (("w4g64-sym", "w4-rotate-gptq-reconstruct-init.yaml"),
                               ("w2g64-asym", "w2-asym-rotate-gptq-reconstruct-init.yaml"))
    ] + [("gptq-w4g64-sym-rot-rec-compressed-targets",
          ["run", str(HERE / "w4-rotate-gptq-reconstruct-compressed-targets.yaml")]),
         ("gptq-w4g64-full-rot-awq-rec-lr005",
          ["run", str(HERE / "w4-full-rotate-awq-gptq-reconstruct-lr005.yaml")]),
         # issue 22's self-calibration goal (within 3% of C4) on the best one-shot W4 g64 recipe
         ("gptq-w4g64-sym-rot-mse-selfcal",
          [*_quant("gptq", 4, 64, True), "--rotate", "--mse", "--calibration", "self"])],
    # Per-layer sparsity at equal total sparsity: uniform SparseGPT, LIM / ZD (+-10% by importance),
    # EvoPress over SparseGPT levels.
    "search-sparsity": [
        row
        for target in (0.5, 0.7)
        for row in [
            (f"sparsegpt-{target}", ["sparsify", "--method", "sparsegpt", "--sparsity", str(target)]),
            *[(f"sparsegpt-{target}-{score}", ["sparsify", "--method", "sparsegpt", "--sparsity", str(target),
                                                "--allocate", score]) for score in ("lim", "zd")],
            (f"evopress-{target}sparsity", _sparsity_search(target)),
        ]
    ],
}


def _fp4(number_format: str, group: int = 0, act_bits: int | None = None, gptq: bool = False) -> list[str]:
    return ["quantize", "--format", number_format, *(["--group-size", str(group)] if group else []),
            *(["--act-bits", str(act_bits)] if act_bits else []), *(["--method", "gptq"] if gptq else [])]


# 4-bit floats (INT4 g64 GPTQ is in the quantize suite): block-scaled NVFP4 / MXFP4, and LLM-FP4's
# format and bias search against plain E2M1 at the same layout and bits; W4A8 / W4A4 simulated;
# the same grids rounded in GPTQ's error-feedback loop (-gptq) instead of to nearest.
SUITES["fp4"] = [
    ("nvfp4", _fp4("nvfp4")),
    ("mxfp4", _fp4("mxfp4")),
    ("e2m1-g64", _fp4("e2m1", 64)),
    ("llm-fp4-g64", _fp4("fp4", 64)),
    ("e2m1-ch", _fp4("e2m1")),
    ("llm-fp4-ch", _fp4("fp4")),
    ("llm-fp4-ch-a8", _fp4("fp4", act_bits=8)),
    ("llm-fp4-ch-a4", _fp4("fp4", act_bits=4)),
    ("nvfp4-gptq", _fp4("nvfp4", gptq=True)),
    ("mxfp4-gptq", _fp4("mxfp4", gptq=True)),
    ("e2m1-g64-gptq", _fp4("e2m1", 64, gptq=True)),
    ("llm-fp4-g64-gptq", _fp4("fp4", 64, gptq=True)),
    ("bnb-nf4-bs64", ["bnb-nf4"]),
    ("bnb-fp4-bs64", ["bnb-fp4"]),
]

# llm-compressor 0.14 on this machine, same protocol (../shared/docs/REFERENCE.md).
REFERENCE = {
    "dense": {"ppl": 21.813},
    "rtn-w4g64-sym": {"ppl": 30.948, "seconds": 0.3},
    "gptq-w4g64-sym": {"ppl": 29.707, "seconds": 321.8},
    "gptq-w3g64-sym": {"ppl": 81.546, "seconds": 303.4},
    "gptq-w4ch-sym": {"ppl": 35.403, "seconds": 317.6},
    "gptq-w4g128-sym": {"note": "refused (576 columns not divisible by 128)"},
    "gptq-w2g64-asym": {"ppl": 49701.489, "note": "reference: symmetric"},
    "sparsegpt-0.5": {"ppl": 45.368, "seconds": 312.7},
    "wanda-0.5": {"ppl": 50.085, "seconds": 210.5},
    "magnitude-0.5": {"note": "reference left the weights dense"},
    "sparsegpt-2of4": {"ppl": 89.644, "seconds": 319.6},
    "wanda-2of4": {"ppl": 187.670, "seconds": 209.6},
    "magnitude-2of4": {"note": "refused by the reference"},
    # bitsandbytes 0.50.2 blockwise absmax, blocks of 64 (4.5 stored bits per weight).
    "e2m1-g64": {"ppl": 33.577, "note": "bitsandbytes FP4 bs64"},
    "llm-fp4-g64": {"ppl": 33.577, "note": "bitsandbytes FP4 bs64"},
    "nvfp4": {"ppl": 27.546, "note": "bitsandbytes NF4 bs64"},
    "bnb-nf4-bs64": {"ppl": 27.546, "seconds": 0.5},
    "bnb-fp4-bs64": {"ppl": 33.577, "seconds": 0.9},
}


def compress(*args: str) -> dict:
    env = {**os.environ, "COMPRESSOR_CACHE": str(WORK / "cache")}
    done = subprocess.run(["compress", *args, "--json"], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"compress {' '.join(args)} failed:\n{done.stderr}")
    return json.loads(done.stdout)


def compress_row(model: Path, name: str, command: list[str]) -> dict:
    if command[0].startswith("bnb-"):  # a baseline through bitsandbytes (bench/baselines.py)
        done = subprocess.run([sys.executable, str(HERE / "baselines.py"), command[0], str(model),
                               str(WORK / name)], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"baseline {command[0]} failed:\n{done.stderr}")
        return json.loads(done.stdout.strip().splitlines()[-1])
    calibration = CALIBRATION
    if "--calibration" in command:  # the row's own calibration source (e.g. self) replaces c4
        at = CALIBRATION.index("--calibration")
        calibration = CALIBRATION[:at] + CALIBRATION[at + 2:]
    return compress(*command, str(model), *calibration, "-o", str(WORK / name), "--overwrite")


def eval_row(model: Path, name: str, made: dict) -> dict:
    evaluation = compress("eval", str(WORK / name), "--baseline", str(model))
    zeros = [m.get("sparsity") for m in made["modules"].values() if m.get("sparsity") is not None]
    return {
        "name": name,
        "ppl": evaluation["perplexity"]["ppl"], "dense_ppl": evaluation["baseline_perplexity"]["ppl"],
        "kl": evaluation["kl"]["kl"], "top1": evaluation["kl"]["top1_agreement"],
        "compress_seconds": made["seconds"]["compress"], "peak_rss_mb": made["peak_rss_mb"],
        "bpw": made["bpw"]["stored"], "size_mib": made["size"]["weights_bytes"] / 2**20,
        "sparsity": sum(zeros) / len(zeros) if zeros else 0.0,
        "perplexity_protocol": {k: evaluation["perplexity"][k] for k in ("seqlen", "windows", "tokens")},
        "kl_protocol": {k: evaluation["kl"][k] for k in ("seqlen", "windows", "tokens")},
    }


def markdown(suite: str, rows: list[dict], environment: dict) -> str:
    lines = [
        f"# {suite} benchmark: SmolLM2-135M-Instruct (fp32), this machine",
        "",
        "Calibration c4 128 x 512 (seed 0). Perplexity: WikiText-2 test, seqlen 2048, 32 windows "
        "(65,536 tokens), stride 2048. KL: dense || compressed on 16 x 512 held-out tokens. "
        f"Threads {environment['threads']}, device cpu. Command: `python bench/run.py {suite}`.",
        "",
        "| run | wt2 ppl | vs dense | KL | top-1 | compress s | peak RSS MiB | bpw | sparsity "
        "| reference ppl | reference s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ref = REFERENCE.get(row["name"], {})
        ref_ppl = f"{ref['ppl']:.3f}" if ref.get("ppl") else ref.get("note", "")
        if ref.get("ppl") and ref.get("note"):
            ref_ppl += f" ({ref['note']})"
        lines.append(
            f"| {row['name']} | {row['ppl']:.3f} | {row['ppl'] / row['dense_ppl']:.2f} "
            f"| {row['kl']:.4f} | {100 * row['top1']:.1f}% | {row['compress_seconds']:.1f} "
            f"| {row['peak_rss_mb']:.0f} | {row['bpw']:.3f} | {row['sparsity']:.3f} | {ref_ppl} "
            f"| {ref.get('seconds', '')} |"
        )
    if rows:
        lines.append(f"\nDense fp32 perplexity: {rows[0]['dense_ppl']:.3f} (reference 21.813).")
    return "\n".join(lines) + "\n"


def run_suite(suite: str, only: list[str] | None, model: Path, resume: bool = False) -> str:
    chosen = [row for row in SUITES[suite] if not only or row[0] in only]
    started = time.time()
    made = []
    for name, command in chosen:
        # Each row's compression result is kept beside its checkpoint, so an interrupted suite can
        # resume (--resume) without recompressing the rows it already finished.
        record = WORK / f"{name}.made.json"
        if resume and record.is_file() and (WORK / name).is_dir():
            made.append(json.loads(record.read_text()))
            continue
        made.append(compress_row(model, name, command))
        record.write_text(json.dumps(made[-1]))
        print(f"[{time.time() - started:6.0f}s] {name}: compress {made[-1]['seconds']['compress']:.1f}s",
              flush=True)
    rows = []
    for (name, _), result in zip(chosen, made, strict=True):
        rows.append(eval_row(model, name, result))
        print(f"[{time.time() - started:6.0f}s] {name}: ppl {rows[-1]['ppl']:.3f}", flush=True)
    import torch

    environment = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / suite
    if only and stem.with_suffix(".json").is_file():
        # A partial rerun replaces its rows in the suite's table and keeps the others.
        fresh = {row["name"]: row for row in rows}
        previous = json.loads(stem.with_suffix(".json").read_text())["rows"]
        rows = [fresh.pop(row["name"], row) for row in previous] + list(fresh.values())
    stem.with_suffix(".json").write_text(json.dumps({"environment": environment, "rows": rows}, indent=2))
    text = markdown(suite, rows, environment)
    stem.with_suffix(".md").write_text(text)
    return text


# Training-based compression (issue 20): each row distils the dense model into a student (a row of
# the quantize / sparsity suites, made here when missing, or the dense model itself with a target
# format) for DISTILL_MINUTES of training on C4 windows, then evaluates it as every row is.
DISTILL_MINUTES = "30"
DISTILL_ROWS: list[tuple[str, str | None, list[str], list[str]]] = [
    # (row, student row or None for the dense model, the student's compress command, distill flags)
    ("gptq-w3g64-asym-kd-params", "gptq-w3g64-asym", _quant("gptq", 3, 64, False), ["--train", "params"]),
    ("gptq-w3g64-asym-kd-scales", "gptq-w3g64-asym", _quant("gptq", 3, 64, False),
     ["--train", "scales", "--minutes", "15"]),
    ("gptq-w3g64-asym-kd-lora", "gptq-w3g64-asym", _quant("gptq", 3, 64, False),
     ["--train", "lora", "--minutes", "15"]),
    # The same student trained on WikiText-2 *validation* (the evaluation's domain, never its test text)
    ("gptq-w3g64-asym-kd-params-wt2val", "gptq-w3g64-asym", _quant("gptq", 3, 64, False),
     ["--train", "params", "--data", "wikitext2"]),
    ("gptq-w2g64-asym-kd-params", "gptq-w2g64-asym", _quant("gptq", 2, 64, False), ["--train", "params"]),
    ("sparsegpt-2of4-kd-params", "sparsegpt-2of4", _prune("sparsegpt", "2:4", False), ["--train", "params"]),
    # The 2:4 student on WikiText-2 validation for 55 minutes at 3x the listed rates (30-step probes,
    # held-out ppl from 163: x1 73.6, x3 66.5, x6 67.9)
    ("sparsegpt-2of4-kd-params-wt2val", "sparsegpt-2of4", _prune("sparsegpt", "2:4", False),
     ["--train", "params", "--data", "wikitext2", "--lr", "3", "--minutes", "55"]),
    ("pgf-2of4", None, [], ["--pattern", "2:4", "--schedule", "pgf"]),
    # ternary: a scale per row, the grid phased in over the first half, weights 5x the listed rate
    # (40-step probes, held-out ppl: per tensor 12673, + ramp 15188, per row + 5x 10882, + ramp 5161)
    ("ternary-b158", None, [], ["--format", "ternary", "--per-channel", "--ramp", "0.5", "--lr", "5"]),
]


def run_distill(model: Path, only: list[str] | None = None, resume: bool = False) -> str:
    rows = []
    previous = RESULTS / "distill.json"
    kept = json.loads(previous.read_text())["rows"] if only and previous.is_file() else []
    for name, student, command, flags in DISTILL_ROWS:
        if only and name not in only:
            continue
        if student is not None and not (WORK / student / "compress.json").is_file():
            (WORK / f"{student}.made.json").write_text(json.dumps(compress_row(model, student, command)))
        source = WORK / student if student else model
        done = WORK / name / "compress.json"
        length = [] if "--minutes" in flags else ["--minutes", DISTILL_MINUTES]
        data = [] if "--data" in flags else ["--data", "c4"]
        made = json.loads(done.read_text()) if resume and done.is_file() else compress(
            "distill", str(source), "--teacher", str(model), *flags, *length, *data, "--seed", "0",
            "--device", "cpu", "-o", str(WORK / name), "--overwrite")
        after = eval_row(model, name, {**made, "seconds": {"compress": made["distill"]["seconds"]}})
        before = _measured_row(student) or eval_row(
            model, student, json.loads((WORK / f"{student}.made.json").read_text())) if student else None
        run = made["distill"]
        rows.append({**after, "before": before, "steps": run["steps"], "tokens": run["tokens"],
                     "train_seconds": run["seconds"], "tokens_per_second": run["tokens_per_second"],
                     "heldout_curve": [(c["tokens"], c["heldout_ppl"]) for c in run["curve"]
                                       if c.get("heldout_ppl")],
                     "precision": run["precision"]})
        start = before["ppl"] if before else after["dense_ppl"]
        print(f"{name}: ppl {after['ppl']:.3f} (before {start:.3f})", flush=True)
    fresh = {row["name"]: row for row in rows}
    rows = [fresh.pop(row["name"], row) for row in kept] + list(fresh.values())
    RESULTS.mkdir(parents=True, exist_ok=True)
    previous.write_text(json.dumps({"rows": rows}, indent=2))
    text = distill_markdown(rows)
    (RESULTS / "distill.md").write_text(text)
    return text


def _measured_row(name: str) -> dict | None:
    """A row some suite already measured under the same protocol (the students' one-shot figures)."""
    for path in sorted(RESULTS.glob("*.json")):
        found = json.loads(path.read_text()) if path.name != "distill.json" else None
        rows = found.get("rows") if isinstance(found, dict) else None
        for row in rows if isinstance(rows, list) else []:
            if isinstance(row, dict) and row.get("name") == name and "ppl" in row:
                return row
    return None


def distill_markdown(rows: list[dict]) -> str:
    lines = ["# distill benchmark: SmolLM2-135M-Instruct (fp32 teacher), this machine", "",
             f"`compress distill STUDENT --teacher dense --minutes {DISTILL_MINUTES} --data c4 FLAGS` (FLAGS "
             "per row below, overriding; batch 4 x 512 tokens, KL at T=1, AdamW + cosine), then the quantize "
             "suite's evaluation (WikiText-2 test, 32 x 2048; KL on 16 x 512 held-out tokens). "
             "Command: `python bench/run.py distill`. Before = the student as compressed one-shot "
             "(the dense model for pgf / ternary rows).", "",
             "| run | ppl before | ppl after | KL before | KL after | top-1 after | bpw | tokens | train s "
             "| tokens/s | peak RSS MiB | precision |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        before = row["before"]
        ppl_before = f"{before['ppl']:.3f}" if before else f"{row['dense_ppl']:.3f} (dense)"
        kl_before = f"{before['kl']:.4f}" if before else "0"
        lines.append(f"| {row['name']} | {ppl_before} | {row['ppl']:.3f} | {kl_before} | {row['kl']:.4f} "
                     f"| {100 * row['top1']:.1f}% | {row['bpw']:.3f} | {row['tokens']} "
                     f"| {row['train_seconds']:.0f} "
                     f"| {row['tokens_per_second']:.0f} | {row['peak_rss_mb']:.0f} | {row['precision']} |")
    flags = {name: " ".join(row_flags) for name, _, _, row_flags in DISTILL_ROWS}
    lines += ["", "Flags per row:", ""] + [f"- {row['name']}: `{flags.get(row['name'], '')}`" for row in rows]
    lines += ["", "Held-out perplexity as training goes (8 x 512 tokens of the training source kept aside: "
              "C4's last 10% of documents; for --data wikitext2 the validation split's last 10%), "
              "tokens: ppl:", ""]
    for row in rows:
        curve = ", ".join(f"{tokens}: {ppl:.2f}" for tokens, ppl in row["heldout_curve"])
        lines.append(f"- {row['name']}: {curve}")
    return "\n".join(lines) + "\n"


# Packed inference (`compress bench-infer`): checkpoints of the quantize / search suites, made here
# when missing. W4 g64 runs torch's int4 kernel (also with int8 token embeddings / tied head);
# W3 g128 asymmetric the per-layer dequant fallback.
INFER_ROWS = [("gptq-w4g64-sym", _quant("gptq", 4, 64, True), "keep"),
              ("gptq-w4g64-sym", _quant("gptq", 4, 64, True), "int8"),
              ("gptq-w3g128-asym", _quant("gptq", 3, 128, False), "keep")]


def run_infer(model: Path) -> str:
    rows = []
    for name, command, embeddings in INFER_ROWS:
        if not (WORK / f"{name}.made.json").is_file() or not (WORK / name).is_dir():
            (WORK / f"{name}.made.json").write_text(json.dumps(compress_row(model, name, command)))
        result = compress("bench-infer", str(WORK / name), "--baseline", str(model),
                          "--embeddings", embeddings, "--repeats", "5")
        label = name + ("" if embeddings == "keep" else f" (embeddings {embeddings})")
        rows.append({"name": label, **result})
        print(f"{name}: decode {result['rows']['packed']['decode_tokens_per_s']:.1f} tok/s", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "infer.json").write_text(json.dumps(rows, indent=2))
    lines = ["# infer benchmark: SmolLM2-135M-Instruct, packed vs dense, this machine", "",
             f"Batch 1 decode of 64 tokens after a 32-token prompt; prefill of 512 tokens; median of 5. "
             f"Threads {rows[0]['threads']}; memory bandwidth (sum over 512 MiB) "
             f"{rows[0]['memory_bandwidth_gb_s']:.1f} GB/s. Packed models compute in bfloat16. "
             "Command: `python bench/run.py infer`.", "",
             "| checkpoint | model | prefill tok/s | decode tok/s | decode ms/token | weights MiB "
             "| decode vs bf16 | prefill vs bf16 | weights vs bf16 | decode / bandwidth bound | backends |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for label, m in row["rows"].items():
            lines.append(
                f"| {row['name']} | {label} | {m['prefill_tokens_per_s']:.0f} "
                f"| {m['decode_tokens_per_s']:.1f} | {m['decode_ms_per_token']:.1f} "
                f"| {m['weight_bytes'] / 2**20:.1f} "
                f"| {m['decode_vs_dense-bfloat16']:.2f} | {m['prefill_vs_dense-bfloat16']:.2f} "
                f"| {m['weights_vs_dense-bfloat16']:.3f} | {m['decode_fraction_of_bound']:.0%} "
                f"| {m.get('backends', '')} |")
    text = "\n".join(lines) + "\n"
    (RESULTS / "infer.md").write_text(text)
    return text


# Knowledge and zero-shot tasks (`compress eval --tasks kick,zeroshot`), compressed vs dense, at
# eval's CPU-friendly default limits (--limit quick): 200 per zero-shot task, 5 MMLU questions per
# subject (285, subjects interleaved), 100 FreebaseQA / TriviaQA questions, 5 CNN stories and
# 5 Vicuna-80 questions.
TASK_ROWS = [("gptq-w4g64-sym", _quant("gptq", 4, 64, True)), ("gptq-w3g64-sym", _quant("gptq", 3, 64, True)),
             ("wanda-2of4", _prune("wanda", "2:4", False)),
             # Learned PTQ before / after (issue 19): the rows of the learned suite, compressed alike.
             ("gptq-w4g64-full-rot-awq-mse",
              [*_quant("gptq", 4, 64, True), "--full-range", "--rotate", "--awq", "--mse"]),
             ("gptq-w3g64-asym", _quant("gptq", 3, 64, False)),
             ("gptq-w3g64-asym-rot-mse", [*_quant("gptq", 3, 64, False), "--rotate", "--mse"]),
             ("gptq-w4g64-sym-rec", [*_quant("gptq", 4, 64, True), "--reconstruct"]),
             ("gptq-w3g64-asym-rec", [*_quant("gptq", 3, 64, False), "--reconstruct"]),
             # Distillation before / after (issue 20); None: a row of the distill suite, trained there.
             ("gptq-w3g64-asym-kd-params", None),
             ("sparsegpt-2of4", _prune("sparsegpt", "2:4", False)),
             ("sparsegpt-2of4-kd-params-wt2val", None)]
TASK_LIMIT = "quick"  # 200 per task; MMLU 285; FreebaseQA, TriviaQA 100; CNN, Vicuna-80 5


def run_tasks(model: Path, only: list[str] | None = None) -> str:
    results = {}
    for name, command in TASK_ROWS:
        if only and name not in only:
            continue
        if not (WORK / name / "compress.json").is_file():
            if command is None:
                run_distill(model, [name])
            else:
                (WORK / f"{name}.made.json").write_text(json.dumps(compress_row(model, name, command)))
        results[name] = compress("eval", str(WORK / name), "--baseline", str(model), "--tasks",
                                 "kick,zeroshot", "--limit", TASK_LIMIT, "--batch-size", "4",
                                 "--report", str(WORK / "tasks" / name))
        print(f"{name}: {results[name]['recovery']}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    previous = RESULTS / "tasks.json"
    if only and previous.is_file():
        results = {**json.loads(previous.read_text()), **results}
    previous.write_text(json.dumps(results, indent=2))
    for name, result in results.items():
        # tasks.json holds each run's eval.json: the HTML covers the runs made on other machines too
        kept = WORK / "tasks" / name / "eval.json"
        if not kept.is_file():
            kept.parent.mkdir(parents=True, exist_ok=True)
            kept.write_text(json.dumps(result, indent=2))
    compress("report", str(WORK / "tasks"), "--html", str(RESULTS / "tasks.html"))
    text = tasks_markdown(results)
    (RESULTS / "tasks.md").write_text(text)
    return text


def tasks_markdown(results: dict) -> str:
    names = [name for name, _ in TASK_ROWS if name in results]
    first = results[names[0]]
    tasks = list(first["tasks"])
    lines = ["# tasks benchmark: SmolLM2-135M-Instruct (fp32 dense) vs compressed, this machine", "",
             f"`compress eval CHECKPOINT --baseline dense --tasks kick,zeroshot --limit {TASK_LIMIT} "
             "--batch-size 4` (command: `python bench/run.py tasks`). Score (recovery = compressed / dense); "
             "wall time per task in seconds (dense / each compressed model); 2 threads, CPU.", "",
             "| task | metric | n | chance | dense | " + " | ".join(names) + " | seconds |",
             "|---|---|---|---|---|" + "---|" * len(names) + "---|"]
    for task in tasks:
        entry = first["tasks"][task]
        metric = entry["primary"]
        dense = entry["dense"]["metrics"][metric]
        cells = []
        for name in names:
            mine = results[name]["tasks"][task]
            share = results[name]["recovery"].get(task)
            cells.append(f"{mine['metrics'][metric]:.3f} ({'n/a' if share is None else f'{share:.2f}'})")
        seconds = " / ".join(f"{results[n]['tasks'][task]['seconds']:.0f}" for n in names)
        chance = entry.get("chance")
        lines.append(f"| {task} | {metric} | {entry['samples']} | {'' if chance is None else chance} "
                     f"| {dense:.3f} ± {entry['dense']['stderr'].get(metric) or 0:.3f} | " + " | ".join(cells)
                     + f" | {entry['dense']['seconds']:.0f} / {seconds} |")
        extra = entry["dense"]["metrics"].get("acc_norm")
        if extra is not None:
            lines.append(f"| {task} | acc_norm | | | {extra:.3f} | " + " | ".join(
                f"{results[n]['tasks'][task]['metrics']['acc_norm']:.3f}" for n in names) + " | |")
        if "rougeL_vs_dense" in entry["metrics"]:
            lines.append(f"| {task} | rougeL vs dense output | | | 1.000 | " + " | ".join(
                f"{results[n]['tasks'][task]['metrics']['rougeL_vs_dense']:.3f}" for n in names) + " | |")
    mmlu = first["tasks"].get("kick_mmlu")
    if mmlu:
        lines += ["", "MMLU by category (dense / " + " / ".join(names) + "):", ""]
        for category, value in mmlu["dense"]["mmlu"]["categories"].items():
            lines.append(f"- {category}: {value:.3f} / " + " / ".join(
                f"{results[n]['tasks']['kick_mmlu']['mmlu']['categories'][category]:.3f}" for n in names))
    return "\n".join(lines) + "\n"


def write_scale(result: dict) -> str:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps(result, indent=2) + "\n")
    seconds = result["seconds"]
    lines = [
        "# scale benchmark: a TinyLlama-shaped random Llama (1.1B parameters, bf16), streamed",
        "",
        f"Command: `{result['command']}`; threads 2, CPU. `python bench/run.py scale`.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| model on disk | {result['model']['bytes_on_disk'] / 2**30:.2f} GiB |",
        f"| peak RSS | {result['peak_rss_mb']:.0f} MiB |",
        f"| compress s (load / calibration / pipeline / write) | {seconds.get('load', 0):.1f} / "
        f"{seconds.get('calibration_data', 0):.1f} / {seconds['compress']:.1f} / {seconds['write']:.1f} |",
        f"| stored bpw / weights | {result['bpw']:.3f} / {result['weights_bytes'] / 2**20:.0f} MiB |",
        f"| SIGKILL after | {result['killed_after_s']:.0f} s; resumed at block "
        f"{result['resumed_at_block']} |",
        f"| resumed peak RSS | {result['resumed_peak_rss_mb']:.0f} MiB |",
        f"| resumed checkpoint byte-identical | {result['identical_after_resume']} "
        f"(sha256 {result['sha256'][:16]}...) |",
        f"| transformers load | {result['transformers_load']} |",
    ]
    text = "\n".join(lines) + "\n"
    (RESULTS / "scale.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    extra = ["infer", "tasks", "scale", "deploy", "gguf", "distill"]
    parser.add_argument("suite", choices=[*SUITES, *extra, "all"], nargs="?", default="all")
    parser.add_argument("--only", nargs="*", help="row names to run")
    parser.add_argument("--resume", action="store_true", help="reuse rows compressed by an earlier run")
    args = parser.parse_args()
    model = prepare(WORK / "smollm2-fp32")
    for suite in [*SUITES, *extra] if args.suite == "all" else [args.suite]:
        if suite == "gguf":
            print(run_gguf(model))
        elif suite == "deploy":
            print(run_deploy(model))
        elif suite == "scale":
            print(write_scale(run_scale(args.resume)))
        elif suite == "infer":
            print(run_infer(model))
        elif suite == "tasks":
            print(run_tasks(model, args.only))
        elif suite == "distill":
            print(run_distill(model, args.only, args.resume))
        else:
            print(run_suite(suite, args.only, model, args.resume))


if __name__ == "__main__":
    main()
