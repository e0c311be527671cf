"""Recipes and plans.

A recipe is plain data (YAML under recipes/): an ordered list of passes, each with its method, its
settings and optionally which modules it targets. A plan is what the pipeline consumes: full module
name -> the steps applied to it. Per-layer choices (mixed bits, a search result) are just plans.

Where a step lands depends on its pass's scope (compressor.passes.Scope): a sub-group pass on each
matching decoder-block linear, a block pass on each matching decoder block (its module name, e.g.
"model.layers.3"), a model pass on the model itself (MODEL_KEY). Targets match the names of that
scope's modules.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from compressor.errors import CompressorError
from compressor.model import block_linears, decoder_blocks
from compressor.passes import Scope, Step, get_pass, scope_of
from compressor.pipeline import MODEL_KEY, Plan

STEP_KEYS = {"method", "targets", "ignore"}


def load_recipe(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CompressorError(f"recipe not found: {path}")
    try:
        recipe = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise CompressorError(f"recipe {path} is not valid YAML: {str(error).splitlines()[0]}")
    if not isinstance(recipe, dict) or not isinstance(recipe.get("passes"), list) or not recipe["passes"]:
        raise CompressorError(f"recipe {path} needs a non-empty list under 'passes'")
    return recipe


def compressible_linears(model) -> list[str]:
    """Full names of the linears inside the decoder blocks (embeddings and lm_head stay as they are)."""
    prefix, blocks = decoder_blocks(model)
    return [f"{prefix}.{i}.{name}" for i, block in enumerate(blocks) for name in block_linears(block)]


def _matches(name: str, patterns: list[str]) -> bool:
    """A pattern is a regex with a 're:' prefix, else a module-name suffix (e.g. 'mlp.down_proj')."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.search(pattern[3:], name):
                return True
        elif name == pattern or name.endswith("." + pattern):
            return True
    return False


def _step_args(raw) -> dict:
    if not isinstance(raw, dict) or "method" not in raw:
        raise CompressorError(f"each recipe pass needs a 'method', got {raw!r}")
    return {k: v for k, v in raw.items() if k not in STEP_KEYS}


# Sub-group passes whose result a block pass can learn: integer and 4-bit float grids, GGUF blocks,
# lookup tables, PTQ1.61's layout, sparse masks (fp4 only without act_bits: a quantized input's shift
# is in the stored columns).
LEARNABLE = {"rtn", "gptq", "fp4", "gguf", "lut", "ptq161", "magnitude", "wanda", "sparsegpt", "dsnot"}


def _learnable(raw: dict) -> bool:
    return raw["method"] in LEARNABLE and not (raw["method"] == "fp4" and raw.get("act_bits") is not None)


def validate_recipe(passes: list[dict]) -> None:
    """Reject unknown methods and bad settings before any model is loaded."""
    for index, raw in enumerate(passes):
        args = _step_args(raw)
        get_pass(raw["method"]).validate(args)
        if scope_of(raw["method"]) == Scope.BLOCK:
            if not any(_learnable(p) for p in passes[:index]):
                found = ", ".join(sorted({p["method"] for p in passes[:index]})) or "no pass"
                raise CompressorError(
                    f"{raw['method']} has nothing to learn after {found}: it refines an integer, "
                    "4-bit float, GGUF or table quantization (gptq, rtn, fp4 without act_bits, gguf, "
                    "lut, ptq161) "
                    "or a sparse mask (magnitude, wanda, sparsegpt) before it")


def decoder_block_names(model) -> list[str]:
    prefix, blocks = decoder_blocks(model)
    return [f"{prefix}.{i}" for i in range(len(blocks))]


def recipe_scopes(passes: list[dict]) -> set[Scope]:
    """The scopes a recipe's passes work at (a model pass means the model is loaded whole)."""
    return {scope_of(raw["method"]) for raw in passes}


def build_plan(model, passes: list[dict]) -> Plan:
    """Expand a recipe's passes over the modules of their scopes."""
    names = {Scope.SUBGROUP: compressible_linears(model), Scope.BLOCK: decoder_block_names(model),
             Scope.MODEL: [MODEL_KEY]}
    plan: Plan = {}
    for raw in passes:
        args = _step_args(raw)
        module = get_pass(raw["method"])
        module.validate(args)
        scope = scope_of(raw["method"])
        # A pass may specialise its settings per module (GGUF presets: a type per tensor role).
        specialise = getattr(module, "module_args", lambda args, name, model: dict(args))
        targets = raw.get("targets") or ["re:.*"]
        ignore = raw.get("ignore") or []
        chosen = [n for n in names[scope] if _matches(n, targets) and not _matches(n, ignore)]
        if not chosen:
            raise CompressorError(f"pass {raw['method']!r}: no module matches targets {targets}")
        for name in chosen:
            plan.setdefault(name, []).append(Step(raw["method"], specialise(args, name, model)))
    order = {name: i for i, name in enumerate([MODEL_KEY, *names[Scope.SUBGROUP], *names[Scope.BLOCK]])}
    return dict(sorted(plan.items(), key=lambda item: order[item[0]]))
