"""The level database: every decoder-block linear compressed at every level, kept packed on disk.

A level is a list of pass steps (plain recipe data), e.g. [gptq bits=3 g128] or [sparsegpt 0.4].
Each linear is compressed at every level against one fixed set of activations, with one set of
input statistics (one Hessian) per sub-group reused for all levels, so a level's result does not
depend on what the other layers chose and a search can mix them freely. The activations are those
of a reference plan run through the sequential pipeline (the search uses the LIM allocation at its
budget), or the dense model's (EvoPress's choice) when there is none.

On disk (written block by block, so an interrupted build resumes at the next block):

    index.json              levels, sub-groups, per-module shapes, per-(module, level) costs
    block-000.safetensors   "<level>/<module>.<tensor>": packed codes (int32), scales, zeros, masks

Quantized levels stay packed (a few bits per weight), unlike the reference implementation, which
keeps dequantized fp16 copies (100-200 GB for a 7B model); safetensors files are memory-mapped.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from safetensors import safe_open
from safetensors.torch import save_file

from compressor import budget, gguf_quants, grids
from compressor.errors import CompressorError
from compressor.files import atomic_write
from compressor.gguf_quants import BlockHeader, GgufGrid, GgufType
from compressor.grids import IntGrid, from_signed
from compressor.model import block_linears, decoder_blocks
from compressor.pack import pack_linear
from compressor.passes import GgufWeight, LinearState, QuantizedWeight, Step, apply_steps, get_pass
from compressor.pipeline import BlockHooks, Plan, compress_model, statistics_needed
from compressor.plan import compressible_linears

INDEX = "index.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Level:
    name: str
    steps: tuple[Step, ...]

    def as_data(self) -> dict:
        return {"name": self.name, "steps": [{"method": s.method, **s.args} for s in self.steps]}

    @classmethod
    def from_data(cls, data: dict) -> Level:
        steps = tuple(Step(d["method"], {k: v for k, v in d.items() if k != "method"}) for d in data["steps"])
        return cls(data["name"], steps)


def quant_levels(bits: list[int], group_size: int = 128, symmetric: bool = False,
                 method: str = "gptq") -> list[Level]:
    """Integer quantization at each bit width, cheapest first."""
    levels = [
        Level(f"w{b}", (Step(method, {"bits": b, "group_size": group_size, "symmetric": symmetric}),))
        for b in sorted(set(bits))
    ]
    for level in levels:
        get_pass(method).validate(level.steps[0].args)
    return levels


def sparsity_levels(step: float = 0.1, highest: float = 0.9, widths: list[int] | None = None,
                    method: str = "sparsegpt") -> list[Level]:
    """Unstructured sparsity from about `highest` down to dense, cheapest (sparsest) first.

    Each level prunes a fixed *count* more weights per row than the one above it, so raising one
    layer and lowering another of the same shape keeps the total exactly (EvoPress). For that the
    step is snapped to a multiple of 1/g, g = gcd of the input widths: k * step * width is then an
    integer for every layer (576 and 1536 columns: steps of 1/192, so 0.1 becomes 19/192).
    """
    if widths:
        unit = math.gcd(*widths)
        step = max(1, round(step * unit)) / unit
    count = int(highest / step + 1e-9)
    fractions = [k * step for k in range(count, 0, -1)]
    levels = [Level(f"s{100 * f:.1f}", (Step(method, {"sparsity": f}),)) for f in fractions]
    for level in levels:
        get_pass(method).validate(level.steps[0].args)
    return levels + [Level("dense", ())]


def gguf_levels(types: list[str]) -> list[Level]:
    """GPTQ onto each GGUF block type (compressor.passes.gguf), in the order given (cheapest first);
    a linear whose rows do not fit a type gets llama.cpp's fallback, at its real cost."""
    levels = [Level(t, (Step("gguf", {"type": t}),)) for t in types]
    for level in levels:
        get_pass("gguf").validate(level.steps[0].args)
    return levels


def _state_tensors(level: str, state: LinearState) -> dict[str, torch.Tensor]:
    prefix = f"{level}/{state.name}."
    tensors = {}
    if isinstance(state.quant, GgufWeight):  # codes and the block header, as the pass left them
        header = state.quant.header
        tensors[prefix + "codes"] = state.quant.codes.contiguous()
        for field in ("d", "dmin", "scale", "min"):
            if getattr(header, field) is not None:
                tensors[prefix + f"header_{field}"] = getattr(header, field).contiguous()
    elif state.quant is not None:
        packed = pack_linear(state.quant)
        tensors[prefix + "weight_packed"] = packed["weight_packed"]
        tensors[prefix + "weight_scale"] = packed["weight_scale"]
        tensors[prefix + "zero"] = state.quant.zero.float().contiguous()
    else:
        tensors[prefix + "weight"] = state.weight.to(state.dtype).contiguous()
    if state.mask is not None:
        tensors[prefix + "mask"] = state.mask.contiguous()
    return tensors


def _state_meta(state: LinearState, dense_bits: int) -> dict:
    out_features, in_features = state.weight.shape
    grid = state.quant.grid if state.quant is not None else None
    kept = int(state.mask.sum()) if state.mask is not None else out_features * in_features
    meta = {
        "methods": state.methods,
        "metrics": {k: v for k, v in state.metrics.items() if isinstance(v, (int, float, str))},
        "costs": budget.linear_costs(out_features, in_features, grid, dense_bits, kept),
    }
    if isinstance(state.quant, GgufWeight):
        meta["gguf_type"] = grid.qtype.value
        meta["act_order"] = state.quant.act_order
    elif grid is not None:
        meta["grid"] = dataclasses.asdict(grid)
        meta["act_order"] = state.quant.act_order
    return meta


def _write_index(folder: Path, index: dict) -> None:
    atomic_write(folder / INDEX, lambda p: p.write_text(json.dumps(index, indent=1)))


class _LevelBuilder(BlockHooks):
    """Pipeline hooks: each sub-group is compressed at every level from the statistics the pipeline
    gathered for it (before the reference plan compresses it), and a block's levels are written
    once the block is done. Blocks already in the index are passed over (a resumed build). The
    block's dense weights are put back once it has passed its output on: the model is unchanged."""

    def __init__(self, folder: Path, index: dict, levels: list[Level], prefix: str, needed: set[str]):
        self.folder, self.index, self.levels, self.prefix = folder, index, levels, prefix
        self.statistics_wanted = frozenset(needed)
        self.dense_bits = budget.DTYPE_BITS.get(index["dtype"], 16)
        self.tensors: dict[str, torch.Tensor] = {}
        self.groups: list[list[str]] = []
        self.dense: dict[str, torch.Tensor] = {}

    def statistics(self, number: int, block, names: list[str], stats) -> None:
        linears = block_linears(block)
        self.dense.update({name: linears[name].weight.data.clone() for name in names})
        if f"{number:03d}" in self.index["blocks"]:
            return
        full = [f"{self.prefix}.{number}.{n}" for n in names]
        self.groups.append(full)
        for name, module_name in zip(names, full, strict=True):
            self.index["modules"][module_name] = {"shape": list(linears[name].weight.shape),
                                                  "block": f"{number:03d}", "levels": {}}
        for level in self.levels:
            # The sub-group's weights are still the dense ones here: the plan compresses it next.
            states = [
                LinearState(name=module_name, weight=linears[n].weight.data.float().clone(),
                            dtype=linears[n].weight.dtype, original=linears[n].weight.data)
                for n, module_name in zip(names, full, strict=True)
            ]
            apply_steps(states, list(level.steps), stats)
            for state in states:
                _store_state(self.tensors, self.index, level.name, state, self.dense_bits)

    def done(self, number: int, block, records, hidden) -> None:
        linears = block_linears(block)
        for name, weight in self.dense.items():
            linears[name].weight.data.copy_(weight)
        self.dense = {}
        key = f"{number:03d}"
        if key in self.index["blocks"]:
            return
        file = f"block-{key}.safetensors"
        atomic_write(self.folder / file, lambda p, t=self.tensors: save_file(t, p))
        self.index["blocks"][key] = file
        self.index["groups"] = [g for g in self.index["groups"]
                                if not g[0].startswith(f"{self.prefix}.{number}.")] + self.groups
        _write_index(self.folder, self.index)
        self.tensors, self.groups = {}, []


def plan_as_data(plan: Plan) -> dict:
    return {name: [{"method": s.method, **s.args} for s in steps] for name, steps in plan.items() if steps}


@torch.no_grad()
def build_database(
    model,
    calibration_ids: torch.Tensor,
    levels: list[Level],
    folder: Path,
    device: str | torch.device = "cpu",
    batch_size: int | None = None,
    identity: dict | None = None,
    on_block=None,
    reference: Plan | None = None,
) -> LevelDatabase:
    """Compress every block linear at every level; resumes a partial build of the same identity.

    Each sub-group's levels are calibrated on the activations it receives when the blocks and
    sub-groups before it are compressed by `reference` (a plan, e.g. an importance allocation at
    the search's budget), or left dense when there is none: the sequential pipeline runs the
    reference plan and, at each sub-group, the levels are made from the same statistics. At 2-3
    bits the compressed model's activations drift far from the dense model's, and levels
    calibrated near the configurations the search visits assemble into a better model.

    `identity` (model, calibration, levels: plain data) is stored in the index; a folder holding a
    database of something else is refused rather than silently mixed.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    identity = {**(identity or {}), "levels": [level.as_data() for level in levels]}
    if reference:
        identity["reference"] = plan_as_data(reference)
    index = _read_index(folder)
    if index is not None and index["identity"] != identity:
        raise CompressorError(
            f"{folder} holds a level database built with other settings; give another --database folder"
        )
    if index is None:
        index = {"format": FORMAT_VERSION, "identity": identity, "levels": [lv.name for lv in levels],
                 "dtype": str(model.dtype).removeprefix("torch."), "blocks": {}, "groups": [],
                 "modules": {}}
    prefix, blocks = decoder_blocks(model)
    if len(index["blocks"]) < len(blocks):
        needed = statistics_needed([s for level in levels for s in level.steps]) or {"hessian"}
        # Every block linear in the plan (dense where the reference leaves it), so that every
        # sub-group's statistics are gathered. A resumed build re-runs the reference plan over the
        # finished blocks (to propagate) but does not rebuild their levels.
        plan = {name: list((reference or {}).get(name, [])) for name in compressible_linears(model)}
        builder = _LevelBuilder(folder, index, levels, prefix, needed)
        compress_model(model, plan, calibration_ids, device, batch_size, on_block, builder)
    return LevelDatabase(folder)


def _store_state(tensors: dict, index: dict, level: str, state: LinearState, dense_bits: int) -> None:
    if not torch.isfinite(state.weight).all():
        raise CompressorError(f"{state.name}: level {level} produced NaN/Inf weights")
    tensors.update({k: v.cpu() for k, v in _state_tensors(level, state).items()})
    index["modules"][state.name]["levels"][level] = _state_meta(state, dense_bits)


def _read_index(folder: Path) -> dict | None:
    path = Path(folder) / INDEX
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CompressorError(f"{path} is not valid JSON: {error}")
    if index.get("format") != FORMAT_VERSION:
        raise CompressorError(f"{path}: unsupported level-database format {index.get('format')!r}")
    return index


class LevelDatabase:
    """Read access to a built database: costs, dequantized weights, and records for packing."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = _read_index(self.folder)
        if index is None:
            raise CompressorError(f"no level database in {self.folder}")
        self.index = index
        self.levels: list[str] = index["levels"]
        self.groups: list[list[str]] = index["groups"]
        self.modules: dict = index["modules"]
        self.dtype = getattr(torch, index["dtype"])
        self._files: dict[str, object] = {}

    def complete(self, block_count: int) -> bool:
        return len(self.index["blocks"]) == block_count

    def cost(self, module: str, level: int, kind: str) -> int:
        return self.modules[module]["levels"][self.levels[level]]["costs"][kind]

    def _tensor(self, module: str, level: str, name: str) -> torch.Tensor | None:
        file = self.index["blocks"][self.modules[module]["block"]]
        if file not in self._files:
            handle = safe_open(str(self.folder / file), framework="pt")
            self._files[file] = (handle, set(handle.keys()))
        handle, keys = self._files[file]
        key = f"{level}/{module}.{name}"
        return handle.get_tensor(key) if key in keys else None

    def state(self, module: str, level: int) -> LinearState:
        """The module at `level` as the pipeline would have left it (weight, codes, mask)."""
        name = self.levels[level]
        meta = self.modules[module]["levels"][name]
        out_features, in_features = self.modules[module]["shape"]
        mask = self._tensor(module, name, "mask")
        state = LinearState(name=module, weight=None, dtype=self.dtype, mask=mask,
                            methods=list(meta["methods"]), metrics=dict(meta["metrics"]))
        if "gguf_type" in meta:
            qtype = GgufType.parse(meta["gguf_type"])
            header = BlockHeader(qtype, **{field: self._tensor(module, name, f"header_{field}")
                                           for field in ("d", "dmin", "scale", "min")})
            codes = self._tensor(module, name, "codes")
            state.quant = GgufWeight(grid=GgufGrid(qtype), codes=codes, header=header,
                                     act_order=meta["act_order"])
            state.weight = gguf_quants.values(codes, header)
        elif "grid" in meta:
            grid = IntGrid(**meta["grid"])
            packed = self._tensor(module, name, "weight_packed")
            shape = torch.Size([out_features, in_features])
            signed = unpack_from_int32(packed, grid.bits, shape)
            codes = from_signed(signed, grid.bits)
            scale = self._tensor(module, name, "weight_scale")
            zero = self._tensor(module, name, "zero")
            state.quant = QuantizedWeight(grid=grid, codes=codes, scale=scale, zero=zero,
                                          act_order=meta["act_order"])
            state.weight = grids.dequantize(codes, scale.float(), zero, grid)
        else:
            state.weight = self._tensor(module, name, "weight").float()
        return state

    def weight(self, module: str, level: int) -> torch.Tensor:
        return self.state(module, level).weight
