"""The Python API: the compressing commands as functions, with the CLI's options as keywords.

    import compressor
    result = compressor.quantize("MODEL", bits=4, group_size=64, reconstruct=True, output="out/w4r")
    result.output, result.manifest["bpw"]

`compress quantize|sparsify|run` are thin wrappers over these (they add the progress bar and the
printing), so the same options give the same checkpoint, byte for byte.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from compressor.job import Calibration, JobResult, run_compression
from compressor.recipes import Job, quantize_job, sparsify_job


def default_output(model: str | None, tag: str, export: str | None = None) -> Path:
    stem = Path(model).stem if model else "SmolLM2-135M-Instruct"
    return Path("out") / (f"{stem}-{tag}" + (".gguf" if export else ""))


def run_job(model: str | None, job: Job, output: str | Path | None = None, *,
            calibration: str = "c4", samples: int = 128, seqlen: int = 512, seed: int = 0,
            batch_size: int | None = None, data_dir: str | None = None, device: str = "auto",
            overwrite: bool = False, resume: bool = False, low_memory: bool = False,
            on_stage: Callable[[str], None] | None = None,
            on_block: Callable[[int, int], None] | None = None) -> JobResult:
    """Compress `model` (a folder, a .gguf file, a hub id; None = the default SmolLM2) as `job` says."""
    from compressor.model import resolve_source

    source = resolve_source(model)
    output = Path(output) if output is not None else default_output(model, job.tag, job.export)
    cal = Calibration(source=calibration, samples=samples, seqlen=seqlen, seed=seed, data_dir=data_dir,
                      batch_size=batch_size)
    if job.export is not None:
        return _to_gguf(source, job, output, cal, device, overwrite, resume, low_memory, on_stage, on_block)
    if job.allocation is not None and job.allocation["score"] == "ip":
        return _integer_programme(source, job, output, cal, device, overwrite, resume, on_stage, on_block)
    return run_compression(source, job.recipe, output, cal, device, overwrite, on_stage, on_block,
                           job.allocation, resume, low_memory)


def _to_gguf(source, job: Job, output: Path, cal: Calibration, device: str, overwrite: bool, resume: bool,
             low_memory: bool, on_stage, on_block) -> JobResult:
    """--format gguf:TYPE: the checkpoint is made beside the output file (resumable like any run),
    exported code for code (compressor.gguf_export), then removed."""
    import shutil

    from compressor.errors import CompressorError
    from compressor.gguf_export import export_gguf, summary

    if output.suffix != ".gguf":
        raise CompressorError(f"--format gguf:{job.export} writes one GGUF file: give -o NAME.gguf, "
                              f"not {output}")
    if output.exists() and not overwrite:
        raise CompressorError(f"output file exists: {output} (pass --overwrite to replace it)")
    folder = output.with_name(f".{output.name}.checkpoint")
    result = run_compression(source, job.recipe, folder, cal, device, overwrite=True, on_stage=on_stage,
                             on_block=on_block, allocation=job.allocation, resume=resume,
                             low_memory=low_memory)
    if on_stage:
        on_stage(f"exporting {output}")
    exported = summary(export_gguf(folder, output, overwrite=overwrite))
    shutil.rmtree(folder)
    return JobResult(output=str(output), manifest={**result.manifest, "gguf": exported})


RUN_KEYS = {"calibration", "samples", "seqlen", "seed", "batch_size", "data_dir", "device", "overwrite",
            "resume", "low_memory", "on_stage", "on_block"}


def _split(options: dict) -> tuple[dict, dict]:
    return ({k: v for k, v in options.items() if k not in RUN_KEYS},
            {k: v for k, v in options.items() if k in RUN_KEYS})


def quantize(model: str | None = None, output: str | Path | None = None, **options) -> JobResult:
    """`compress quantize`: bits, group_size, symmetric, full_range, awq, method, number_format,
    act_bits, act_order, mse, damp, allocate, budget, rotate, reconstruct, reconstruct_train,
    reconstruct_iters, and the run options of run_job (calibration, samples, seqlen, seed, device, ...)."""
    recipe_options, run_options = _split(options)
    return run_job(model, quantize_job(**recipe_options), output, **run_options)


def sparsify(model: str | None = None, output: str | Path | None = None, **options) -> JobResult:
    """`compress sparsify`: pattern or sparsity, method, dsnot, allocate, spread, dsnot_criterion,
    max_cycles, update_threshold, rotate, reconstruct, ..., and the run options of run_job."""
    recipe_options, run_options = _split(options)
    return run_job(model, sparsify_job(**recipe_options), output, **run_options)


def run(recipe: str | Path | dict, model: str | None = None, output: str | Path | None = None,
        **options) -> JobResult:
    """`compress run`: the passes of a recipe (a YAML path or the same data as a dict)."""
    from compressor.plan import load_recipe

    tag = "recipe"
    if not isinstance(recipe, dict):
        tag = Path(recipe).stem
        recipe = load_recipe(recipe)
    return run_job(model, Job(recipe, None, tag), output, **options)


def _integer_programme(source, job: Job, output: Path, cal: Calibration, device: str, overwrite: bool,
                       resume: bool, on_stage, on_block) -> JobResult:
    """`--allocate ip`: the search's level database (GPTQ at 2-6 bits on the job's grid), per-unit
    KL growths, AdaQuant's integer programme; the checkpoint is written as `compress search` does."""
    from compressor.search.run import SearchJob, run_search

    step = job.recipe["passes"][0]
    search = SearchJob(budget=str(job.allocation["budget"]), group_size=step["group_size"],
                       symmetric=step["symmetric"], algorithm="ip")
    return run_search(None if resume else source, search, output, cal, device, overwrite, None, resume,
                      on_stage, on_block)
