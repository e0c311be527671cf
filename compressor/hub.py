"""Publishing a compressed checkpoint on the Hugging Face Hub, with a model card that says what was done.

A checkpoint folder is pushed as it is: every file compress wrote (compress.json lists their SHA-256),
plus `eval.json` / `eval.md` when `compress eval` has written them beside the weights. The model card
is made here from compress.json and uploaded as the repo's README.md in the same commit; it is never
written into the folder, whose files are checksummed.

The upload is one `HfApi.create_commit` with a `CommitOperationAdd` per file rather than
`upload_folder`: with hf_xet installed, huggingface_hub 2.x routes `upload_folder` through a streamed
multi-commit pipeline that may split a folder into several commits, so a reader could see weights
without their card or config. One commit keeps the repo consistent at every revision.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path, PurePosixPath

import yaml
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HfHubHTTPError

from compressor.errors import CompressorError

MANIFEST = "compress.json"  # compressor.writer.MANIFEST (not imported: that module pulls in torch)
CONFIG = "config.json"
RECIPE = "recipe.yaml"
EVALUATION = "eval.json"  # what `compress eval` writes into the folder it evaluated
CARD = "README.md"

# compress writes each file under NAME.tmp and its resume state under .resume/ (compressor.files,
# compressor.writer); an unfinished run lives in .NAME.partial. None of these belong in a release,
# nor do hidden folders such as .git or .cache.
_LEFTOVER_SUFFIXES = (".tmp", ".partial")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CACHE_SNAPSHOT = re.compile(r"models--([\w.-]+)--([\w.-]+)")

_METHOD_NAMES = {
    "gptq": "GPTQ",
    "rtn": "round-to-nearest (RTN)",
    "awq": "AWQ activation-aware scaling",
    "sparsegpt": "SparseGPT",
    "wanda": "Wanda pruning",
    "magnitude": "magnitude pruning",
    "dsnot": "DSnoT mask refinement",
    "rotate": "a Hadamard rotation folded into the weights",
    "reconstruct": "block reconstruction",
    "fp4": "4-bit floating point",
}
_QUANTIZERS = {"gptq", "rtn"}  # the passes that choose the stored integer codes


def checkpoint_files(folder: Path) -> list[str]:
    """The files of `folder` to publish, as sorted repo paths: everything but compress's staging and
    resume leftovers, hidden files and a README.md (the card replaces it)."""
    folder = Path(folder)
    found = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if not path.is_file() or any(part.startswith(".") for part in relative.parts):
            continue
        if path.name.endswith(_LEFTOVER_SUFFIXES) or relative.as_posix() == CARD:
            continue
        found.append(PurePosixPath(*relative.parts).as_posix())
    return sorted(found)


def read_checkpoint(folder: Path) -> tuple[dict, dict]:
    """(compress.json, config.json) of a finished checkpoint; anything else is one clear error,
    raised before any upload starts."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CompressorError(f"not a checkpoint folder: {folder}")
    if folder.name.startswith(".") and folder.name.endswith(".partial"):
        raise CompressorError(f"{folder} is the staging folder of an unfinished run, not a checkpoint")
    for name in (CONFIG, MANIFEST):
        if not (folder / name).is_file():
            raise CompressorError(f"not a checkpoint written by compress (no {name}): {folder}")
    documents = []
    for name in (MANIFEST, CONFIG):
        try:
            documents.append(json.loads((folder / name).read_text()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CompressorError(f"cannot read {folder / name}: {_first_line(error)}")
    manifest, config = documents
    if not isinstance(manifest, dict) or not isinstance(config, dict):
        raise CompressorError(f"not a checkpoint written by compress (bad {MANIFEST}): {folder}")
    # A file the manifest lists but the folder lacks would publish a checkpoint that cannot load.
    listed = (manifest.get("checksum") or {}).get("files") or {}
    missing = sorted(name for name in listed if not (folder / name).is_file())
    if missing:
        raise CompressorError(f"checkpoint {folder} is incomplete: {', '.join(missing)} listed in "
                              f"{MANIFEST} but missing")
    return manifest, config


def base_model(source: dict | None) -> str | None:
    """The model a checkpoint was made from, as the card's `base_model`: its hub id when it came from
    the hub (directly or from the HF cache), else the name of the local folder or GGUF file."""
    if not source or not source.get("path"):
        return None
    path = str(source["path"])
    cached = _CACHE_SNAPSHOT.search(path)
    if cached:
        return f"{cached.group(1)}/{cached.group(2)}"
    # compress accepts a hub id only when no local path of that name exists (compressor.model).
    if _HUB_ID.match(path) and not Path(path).exists():
        return path
    return source.get("gguf_file") or Path(path).name or path


def model_card(folder: Path, evaluation: dict | None = None, repo_id: str | None = None) -> str:
    """README.md for the hub repo of the checkpoint in `folder`: metadata the Hub indexes (base model,
    relation, library, tags), what was done, what it stores, the recipe and how to load it.

    `evaluation` is the JSON of `compress eval` (what `--json` prints); when it is None the folder's
    eval.json is used if `compress eval` left one there. `repo_id` goes into the loading snippets
    (the folder name when not given)."""
    folder = Path(folder)
    manifest, config = read_checkpoint(folder)
    if evaluation is None:
        evaluation = _saved_evaluation(folder)
    recipe = manifest.get("recipe") or {}
    passes = [p for p in recipe.get("passes") or [] if isinstance(p, dict)]
    quant = config.get("quantization_config") or {}
    base = base_model(manifest.get("source"))
    repo = repo_id or folder.name

    tags = ["compressor"]
    if quant.get("quant_method") == "compressed-tensors":
        tags.append("compressed-tensors")
    tags += [str(p["method"]) for p in passes if p.get("method")]
    tags += [str(p["format"]) for p in passes if p.get("method") == "fp4" and p.get("format")]
    data = ModelCardData(base_model=base, library_name="transformers", pipeline_tag="text-generation",
                         tags=list(dict.fromkeys(tags)), base_model_relation="quantized")

    sections = [_title(base, manifest), _description(base, manifest, config, passes),
                _size_section(manifest)]
    if evaluation:
        sections.append(_evaluation_section(evaluation))
    sections += [_recipe_section(folder, recipe, base), _loading_section(repo, quant)]
    body = "\n\n".join(s for s in sections if s) + "\n"
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def push_to_hub(folder: Path, repo_id: str, *, token: str | None = None, private: bool = False,
                endpoint: str | None = None, evaluation: dict | None = None,
                commit_message: str | None = None) -> str:
    """Create `repo_id` (if needed) and commit the checkpoint in `folder` with its model card as
    README.md, in one commit; returns the repo URL.

    Everything that can fail locally (not a checkpoint, a bad repo id, unreadable files) fails before
    the first request. `token` None means huggingface_hub's own lookup (HF_TOKEN, the saved login);
    `endpoint` None means the public Hub (or HF_ENDPOINT)."""
    from huggingface_hub.utils import validate_repo_id

    folder = Path(folder)
    manifest, _ = read_checkpoint(folder)
    try:
        validate_repo_id(repo_id)
    except ValueError as error:
        raise CompressorError(f"invalid repo id {repo_id!r}: {_first_line(error)}")
    card = model_card(folder, evaluation, repo_id)
    try:
        # Each addition hashes its file now, so an unreadable file fails here, before any request.
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name))
                      for name in checkpoint_files(folder)]
    except (OSError, ValueError) as error:
        raise CompressorError(f"cannot read the checkpoint {folder}: {_first_line(error)}")
    operations.append(CommitOperationAdd(path_in_repo=CARD, path_or_fileobj=card.encode()))
    message = commit_message or f"Upload {_headline(base_model(manifest.get('source')), manifest)}"
    api = HfApi(endpoint=endpoint, token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.create_commit(repo_id, operations, commit_message=message)
    except (OSError, ValueError, _transport_error()) as error:
        # HfHubHTTPError and offline mode are OSErrors; a refused connection is httpx's own error;
        # an invalid card (the Hub's YAML check) is a ValueError.
        raise CompressorError(f"cannot push to {repo_id} on {api.endpoint}: {_one_line(error)}")
    return str(url)


def _transport_error() -> type[Exception]:
    # huggingface_hub 1.x and later speak httpx (2.x: its fork httpx2); connection failures raise
    # that library's errors, which are not OSErrors.
    for name in ("httpx2", "httpx"):
        try:
            return importlib.import_module(name).HTTPError
        except (ImportError, AttributeError):
            continue
    return OSError


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _one_line(error: BaseException) -> str:
    """The first line of a huggingface_hub error, with the server's own message (an HTTP error's first
    line is only its status) or the YAML check's findings (its "- ..." lines)."""
    text = _first_line(error)
    server = getattr(error, "server_message", None) if isinstance(error, HfHubHTTPError) else None
    extra = [server.strip().splitlines()[0]] if server and server.strip() else []
    extra += [line.strip()[2:] for line in str(error).splitlines()[1:] if line.strip().startswith("- ")]
    extra = [e for e in dict.fromkeys(extra) if e and e not in text]
    return f"{text.rstrip('.:')}: {'; '.join(extra)}" if extra else text


def _saved_evaluation(folder: Path) -> dict | None:
    path = folder / EVALUATION
    if not path.is_file():
        return None
    try:
        found = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CompressorError(f"cannot read {path}: {_first_line(error)}")
    return found if isinstance(found, dict) else None


def _stored_bpw(manifest: dict) -> float | None:
    value = (manifest.get("bpw") or {}).get("stored")
    return float(value) if isinstance(value, (int, float)) else None


def _headline(base: str | None, manifest: dict) -> str:
    stored = _stored_bpw(manifest)
    name = base or "model"
    return f"{name} compressed to {stored:.2f} bits per weight" if stored else f"{name}, compressed"


def _title(base: str | None, manifest: dict) -> str:
    return f"# {_headline(base, manifest)}"


def _grid_text(step: dict) -> str:
    # Defaults as compressor.passes.grid_from_args applies them to a recipe step.
    bits, group = step.get("bits", 4), step.get("group_size", 128)
    group_text = ("per output channel" if group in (0, -1) else
                  "in groups chosen per matrix from its weights (FineQuant)" if group == "auto" else
                  f"in groups of {group} columns")
    if not step.get("symmetric", True):
        kind = "asymmetric (with zero points)"
    elif step.get("full_range"):
        kind = "symmetric, full range"
    else:
        kind = "symmetric"
    return f"{bits}-bit integers {group_text}, {kind}"


def _step_text(step: dict) -> str:
    method = str(step.get("method", "?"))
    name = _METHOD_NAMES.get(method, method)
    if method in _QUANTIZERS or (method == "sparsegpt" and "bits" in step):
        text = f"{name} to {_grid_text(step)}"
        if method == "sparsegpt":
            text = f"SparseGPT ({_sparsity_text(step)}, survivors quantized to {_grid_text(step)})"
        return text
    if method in ("sparsegpt", "wanda", "magnitude"):
        return f"{name} ({_sparsity_text(step)})"
    if method == "awq":
        return f"{name} for {_grid_text(step)}"
    if method == "fp4":
        text = f"{name} ({str(step.get('format', 'nvfp4')).upper()})"
        if step.get("act_bits"):
            text += f", activations at {step['act_bits']} bits simulated (not stored, no kernel runs them)"
        return text
    if method == "lut":
        group = step.get("group_size", 64)
        scales = "one float16 scale per row" if group in (0, -1) else f"a float16 scale per {group} columns"
        return (f"learned lookup tables ({str(step.get('format', 'lut4')).upper()}: codes into a table of "
                f"values learned per row, {scales}; {_METHOD_NAMES.get(step.get('solver', 'gptq'), 'GPTQ')})")
    if method == "ptq161":
        share = round(100 * float(step.get("salient", 0.2)))
        solver = _METHOD_NAMES.get(step.get("solver", "gptq"), "GPTQ")
        return (f"PTQ1.61 ({share}% of input channels, those of the largest activations, at "
                f"{step.get('salient_bits', 4)} bits per row; the rest binarised with a learned scale per "
                f"row and column; {solver}-style error feedback)")
    if method == "reconstruct":
        return f"{name} (trained: {step.get('train', 'rounding')}, {step.get('iters', 50)} iterations)"
    return name


def _merge_targeted(passes: list[dict]) -> list[dict]:
    """Passes that differ only in their targets and width (a mixed-precision allocation or search
    writes one per level) as one step whose bits read "3/4": they act side by side, not in turn."""
    merged: list[dict] = []
    for step in passes:
        rest = {k: v for k, v in step.items() if k not in ("targets", "bits", "sparsity")}
        last = merged[-1] if merged else None
        if (last is not None and "targets" in step and last.get("_targeted")
                and last["_rest"] == rest):
            for key in ("bits", "sparsity"):
                if key in step and step[key] not in last["_values"][key]:
                    last["_values"][key].append(step[key])
            continue
        entry = dict(step, _targeted="targets" in step, _rest=rest,
                     _values={k: [step[k]] if k in step else [] for k in ("bits", "sparsity")})
        merged.append(entry)
    for entry in merged:
        values = entry.pop("_values")
        entry.pop("_rest"), entry.pop("_targeted")
        if len(values["bits"]) > 1:
            entry["bits"] = "/".join(f"{b:g}" for b in sorted(values["bits"]))
        if len(values["sparsity"]) > 1:
            entry["sparsity"] = sorted(values["sparsity"])
    return merged


def _sparsity_text(step: dict) -> str:
    if step.get("pattern"):
        kept, block = str(step["pattern"]).split(":", 1)
        return f"{step['pattern']}: {kept} of every {block} weights kept"
    if isinstance(step.get("sparsity"), list):
        low, high = step["sparsity"][0], step["sparsity"][-1]
        return f"{100 * float(low):g}% to {100 * float(high):g}% of each row pruned, per layer"
    if step.get("sparsity") is not None:
        return f"{100 * float(step['sparsity']):g}% of each row pruned"
    return "pruned"


def _description(base: str | None, manifest: dict, config: dict, passes: list[dict]) -> str:
    if base and _HUB_ID.match(base):
        origin = f"[{base}](https://huggingface.co/{base})"
    else:
        origin = f"`{base}`" if base else "a model"
    steps = list(dict.fromkeys(_step_text(p) for p in _merge_targeted(passes))) or ["no passes"]
    version = manifest.get("compressor_version")
    text = (f"This model is {origin} compressed with compressor{f' {version}' if version else ''}: "
            f"{'; then '.join(steps)}.")
    widths = sorted({m.get("bits") for m in (manifest.get("modules") or {}).values()
                     if isinstance(m, dict) and isinstance(m.get("bits"), (int, float))})
    if len(widths) > 1:
        counts = [sum(1 for m in manifest["modules"].values() if isinstance(m, dict) and m.get("bits") == w)
                  for w in widths]
        text += " Bits differ per linear: " + ", ".join(
            f"{w:g} bits ({n} linears)" for w, n in zip(widths, counts, strict=True)) + "."
    allocation = (manifest.get("recipe") or {}).get("allocation")
    if isinstance(allocation, dict) and allocation.get("score"):
        text += f" The widths were allocated by {str(allocation['score']).upper()} layer importance."
    if isinstance(manifest.get("search"), dict):
        text += " The per-layer levels were chosen by an EvoPress search (see compress.json)."
    quant = config.get("quantization_config") or {}
    if quant.get("quant_method") == "compressed-tensors":
        if quant.get("format"):
            text += (" The decoder-block linears are stored in the compressed-tensors "
                     f"`{quant['format']}` format")
            text += " with sparsity metadata." if quant.get("sparsity_config") else "."
        elif quant.get("sparsity_config"):
            text += " The pruned weights are stored densely with compressed-tensors' sparsity metadata."
    elif quant.get("quant_method"):
        text += f" The weights use the `{quant['quant_method']}` layout."
    if manifest.get("dtype"):
        text += f" Embeddings, norms and the head stay in {manifest['dtype']}."
    calibration = manifest.get("calibration")
    if isinstance(calibration, dict) and calibration.get("source"):
        text += (f" Calibration: {Path(str(calibration['source'])).name}, {calibration.get('samples')} "
                 f"windows of {calibration.get('seqlen')} tokens.")
    return text


def _size_section(manifest: dict) -> str:
    bpw = manifest.get("bpw") or {}
    lines = ["## Bits per weight", "",
             "Over the decoder-block linears (embeddings and head excluded):", "",
             "| | bits per weight |", "|---|---|"]
    if bpw.get("stored") is not None:
        lines.append(f"| stored (codes + scales + zero points) | {float(bpw['stored']):.3f} |")
    if bpw.get("levels") is not None:
        lines.append(f"| integer code width (levels, as papers quote) | {float(bpw['levels']):.2f} |")
    if bpw.get("weights"):
        lines += ["", f"{int(bpw['weights']):,} weights."]
    size = manifest.get("size") or {}
    if size.get("weights_bytes"):
        text = f"Weights on disk: {_mib(size['weights_bytes'])} ({int(size['weights_bytes']):,} bytes)"
        if size.get("folder_bytes"):
            text += f"; the whole checkpoint {_mib(size['folder_bytes'])}"
        lines += ["", text + "."]
    return "\n".join(lines)


def _mib(count) -> str:
    return f"{float(count) / 2**20:.1f} MiB"


def _fmt(value, digits: int) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "n/a"


def _evaluation_section(result: dict) -> str:
    """Quality next to the dense model, from `compress eval`'s JSON: perplexity, KL, tasks."""
    ppl, base, kl = (result.get("perplexity") or {}, result.get("baseline_perplexity") or {},
                     result.get("kl") or {})
    rows = []
    if ppl.get("ppl") is not None or base.get("ppl") is not None:
        protocol = ppl or base
        label = (f"perplexity ({protocol.get('dataset', '?')}, {protocol.get('seqlen')} tokens x "
                 f"{protocol.get('windows')} windows)")
        ratio = (f"{ppl['ppl'] / base['ppl']:.3f}x" if isinstance(ppl.get("ppl"), (int, float))
                 and isinstance(base.get("ppl"), (int, float)) and base["ppl"] else "")
        rows.append(f"| {label} | {_fmt(ppl.get('ppl'), 3)} | {_fmt(base.get('ppl'), 3)} | {ratio} |")
    if kl.get("kl") is not None:
        rows.append(f"| KL(dense \\|\\| this model), nats/token ({kl.get('dataset', '?')}) | "
                    f"{_fmt(kl['kl'], 4)} | 0 | |")
    if kl.get("top1_agreement") is not None:
        rows.append(f"| top-1 agreement with dense | {100 * kl['top1_agreement']:.1f}% | 100% | |")
    recovery = result.get("recovery") or {}
    for task, entry in (result.get("tasks") or {}).items():
        primary = entry.get("primary")
        mine = (entry.get("metrics") or {}).get(primary)
        dense = ((entry.get("dense") or {}).get("metrics") or {}).get(primary)
        share = recovery.get(task)
        rows.append(f"| {task} ({primary}) | {_fmt(mine, 4)} | {_fmt(dense, 4)} | "
                    f"{'' if share is None else f'{share:.3f} recovered'} |")
    if not rows:
        return ""
    lines = ["## Evaluation", ""]
    if result.get("baseline"):
        lines += [f"Dense baseline: `{base_model({'path': result['baseline']})}`.", ""]
    lines += ["| metric | this model | dense | ratio |", "|---|---|---|---|", *rows]
    return "\n".join(lines)


def _recipe_section(folder: Path, recipe: dict, base: str | None) -> str:
    path = folder / RECIPE
    text = path.read_text() if path.is_file() else yaml.safe_dump(recipe, sort_keys=False)
    return "\n".join(["## Recipe", "", "```yaml", text.rstrip(), "```", "",
                      "Reproduce with `compress run recipe.yaml "
                      f"{base if base and _HUB_ID.match(base) else 'MODEL'} -o out` "
                      "(compress.json records the calibration and versions)."])


def _loading_section(repo: str, quant: dict) -> str:
    lines = ["## Use", ""]
    method = quant.get("quant_method")
    if method in ("compressed-tensors", None):
        needs = " (and `compressed-tensors` installed)" if method else ""
        lines += [f"With transformers{needs}:", "", "```python",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'model = AutoModelForCausalLM.from_pretrained("{repo}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{repo}")', "```"]
        if _needs_compressor_loader(quant):
            lines += ["", "Several schemes with packed zero points: stock transformers stops on this layout "
                      "(a compressed-tensors 0.20 bug); load it with compressor instead:", "", "```python",
                      "import compressor", "from huggingface_hub import snapshot_download", "",
                      f'model, tokenizer = compressor.load(snapshot_download("{repo}"))', "```"]
        if method == "compressed-tensors":
            lines += ["", "With vLLM:", "", "```python", "from vllm import LLM", "",
                      f'llm = LLM(model="{repo}")',
                      'print(llm.generate("The capital of France is")[0].outputs[0].text)', "```"]
    else:
        lines += [f"The `{method}` layout is compressor's own; load it with compressor:", "", "```python",
                  "from huggingface_hub import snapshot_download",
                  "from compressor.model import ModelSource, load_model", "",
                  f'model, tokenizer = load_model(ModelSource(snapshot_download("{repo}")))', "```"]
    return "\n".join(lines)


def _needs_compressor_loader(quant: dict) -> bool:
    # compressor.upstream: compressed-tensors 0.20 builds its loading skeleton with unpacked zero
    # points, so a multi-scheme checkpoint with asymmetric group/channel layers (no "dequantize"
    # key) fails in stock transformers.
    groups = [g for g in (quant.get("config_groups") or {}).values() if isinstance(g, dict)]
    if len(groups) < 2 or quant.get("dequantize"):
        return False
    return any((g.get("weights") or {}).get("symmetric") is False
               and (g.get("weights") or {}).get("strategy") in ("group", "channel") for g in groups)
