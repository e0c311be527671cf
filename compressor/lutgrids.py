"""Learned lookup-table grids (`--format lut4|lut3`): any4's per-row tables, JLCM's learned codebooks.

A weight is a code of `bits` bits that indexes a small table of 2^bits float16 values learned for its
row (or shared by `table_rows` consecutive rows), times a float16 scale per group of columns:

    w[r, j] ~= scale[r, j // group] * table[r // table_rows, code[r, j]]

The scale is the group's largest magnitude, so the table works on values in [-1, 1]; unlike a uniform
grid (INT4) or a fixed one (NF4, IQ4_NL's 16 values), the table puts its 2^bits levels where the row's
weights are, weighted by how much each input matters. Free functions over tensors, as grids.py:

    fit_scales(w, grid)                     -> scale [out, groups] (float16 values, float32)
    fit_tables(w, scale, grid, importance)  -> table [tables, 2^bits] by weighted k-means
    round_to(w, scale, table, grid)         -> codes (nearest table value)
    values(codes, scale, table, grid)       -> the weights a loader computes
    refit_tables(w, codes, scale, grid, H)  -> the tables that minimise the layer's output error
    sort_tables(table, codes, grid)         -> ascending tables, codes renumbered to match
    stored_bits(out, in)                    -> codes packed in int32 words, scales and tables in float16
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compressor.errors import CompressorError
from compressor.gguf_quants import TABLES, GgufType
from compressor.grids import group_index

LUT_FORMATS = {"lut4": 4, "lut3": 3}
# llama.cpp's fixed non-uniform 4-bit table: one start of the k-means (so a learned table is never
# worse than it under the same scales).
IQ4_NL_VALUES = TABLES[GgufType.IQ4_NL]
KMEANS_ITERATIONS = 25


@dataclass(frozen=True)
class LutGrid:
    """How one weight matrix is stored: plain data, shared by the pass, the writer and the loader."""

    bits: int = 4
    group_size: int = 64  # columns per scale (0 = one scale per row)
    table_rows: int = 1  # consecutive rows that share one table

    @property
    def format(self) -> str:
        return f"lut{self.bits}"

    @property
    def levels(self) -> int:
        return 2**self.bits

    @property
    def symmetric(self) -> bool:
        return True  # no zero point: the table holds any offset (for reports that ask)

    def group_width(self, in_features: int) -> int:
        return in_features if self.group_size <= 0 else min(self.group_size, in_features)

    def num_groups(self, in_features: int) -> int:
        return -(-in_features // self.group_width(in_features))

    def num_tables(self, out_features: int) -> int:
        return -(-out_features // self.table_rows)

    def stored_bits(self, out_features: int, in_features: int) -> int:
        """Codes packed densely in int32 words per row, a float16 scale per group, float16 tables."""
        words = -(-in_features * self.bits // 32)
        return (out_features * words * 32 + out_features * self.num_groups(in_features) * 16
                + self.num_tables(out_features) * self.levels * 16)


def parse_grid(args: dict) -> LutGrid:
    """A LutGrid from recipe settings or a checkpoint's quantization_config (format lut4 | lut3,
    group_size, table_rows; other keys ignored), validated."""
    name = str(args.get("format", "lut4")).lower()
    if name not in LUT_FORMATS:
        raise CompressorError(f"unknown lookup-table format {name!r}; choose {' or '.join(LUT_FORMATS)}")
    group_size, table_rows = args.get("group_size", 64), args.get("table_rows", 1)
    for key, value, low in (("group_size", group_size, -1), ("table_rows", table_rows, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise CompressorError(f"{name}: {key} must be an integer >= {low}, got {value!r}")
    return LutGrid(LUT_FORMATS[name], max(group_size, 0), table_rows)


def _half(x: torch.Tensor) -> torch.Tensor:
    """Float16 values held in float32: what is stored, and what every computation uses."""
    return x.to(torch.float16).float()


def spread(per_group: torch.Tensor, in_features: int, grid: LutGrid) -> torch.Tensor:
    """[out, groups] -> [out, in]: each column gets its group's value (a ragged last group too)."""
    return per_group[:, group_index(in_features, grid.group_width(in_features)).to(per_group.device)]


def fit_scales(w: torch.Tensor, grid: LutGrid) -> torch.Tensor:
    """Each group's largest magnitude (float16), so w / scale lies in [-1, 1]; 1 for an all-zero group."""
    rows, cols = w.shape
    width = grid.group_width(cols)
    groups = grid.num_groups(cols)
    padded = torch.nn.functional.pad(w.float().abs(), (0, groups * width - cols))
    absmax = padded.view(rows, groups, width).amax(-1)
    return _half(torch.where(absmax > 0, absmax, torch.ones_like(absmax)))


def _table_sets(x: torch.Tensor, grid: LutGrid) -> torch.Tensor:
    """[out, in] -> [tables, table_rows * in]: the values each table serves (a last, shorter set of
    rows padded by repeating its last row; fit_tables gives the padding weight 0)."""
    rows, cols = x.shape
    tables = grid.num_tables(rows)
    pad = tables * grid.table_rows - rows
    if pad:
        x = torch.cat([x, x[-1:].expand(pad, cols)])
    return x.reshape(tables, grid.table_rows * cols)


def fit_tables(w: torch.Tensor, scale: torch.Tensor, grid: LutGrid,
               importance: torch.Tensor | None = None, iterations: int = KMEANS_ITERATIONS) -> torch.Tensor:
    """Tables [tables, 2^bits] (float16 values, ascending) by weighted k-means of w / scale.

    The weight of w[r, j] is importance[j] * scale[r, j]^2: its squared error in the weight's own
    units, times how much input j matters (the diagonal of the layer's input Hessian; 1 without
    data). Lloyd's iterations (assignment = nearest value, by the midpoints of the sorted table)."""
    rows, cols = w.shape
    s = spread(scale, cols, grid)
    u = (w.float() / s).clamp(-1, 1)
    weight = s.square() * (importance.float().clamp_min(0)[None, :] if importance is not None else 1.0)
    pad_rows = grid.num_tables(rows) * grid.table_rows - rows
    u_sets = _table_sets(u, grid)
    weight_sets = _table_sets(weight, grid)
    if pad_rows:
        weight_sets[-1, -pad_rows * cols:] = 0
    weight_sets = weight_sets + 1e-12  # every value counts a little: an all-dead row still gets a table
    # Lloyd's iterations never raise the error, but 1-D k-means has local optima: start from a
    # uniform grid over the values' range, the weighted quantiles and (4 bits) IQ4_NL's fixed table
    # both ways round, and keep the best result per table, so a learned table is never worse than
    # those grids under the same scales.
    low, high = u_sets.amin(1, keepdim=True), u_sets.amax(1, keepdim=True)
    starts = [low + (high - low) * torch.linspace(0, 1, grid.levels),
              _weighted_quantiles(u_sets, weight_sets, grid.levels)]
    if grid.levels == len(IQ4_NL_VALUES):
        fixed = torch.tensor(IQ4_NL_VALUES, dtype=torch.float32) / 127
        starts += [fixed.expand_as(starts[0]), (-fixed).flip(0).expand_as(starts[0])]
    best, best_error = None, None
    for start in starts:
        table = _lloyd(u_sets, weight_sets, start, iterations)
        error = _kmeans_error(u_sets, weight_sets, table)
        if best is None:
            best, best_error = table, error
        else:
            better = (error < best_error).unsqueeze(1)
            best, best_error = torch.where(better, table, best), torch.minimum(error, best_error)
    return _half(best).sort(dim=1).values


def _lloyd(u: torch.Tensor, weight: torch.Tensor, table: torch.Tensor, iterations: int) -> torch.Tensor:
    for _ in range(iterations):
        codes = nearest(u, table)
        total = torch.zeros_like(table).scatter_add_(1, codes, weight)
        moment = torch.zeros_like(table).scatter_add_(1, codes, weight * u)
        updated = torch.where(total > 0, moment / total.clamp_min(1e-30), table).sort(dim=1).values
        if torch.equal(updated, table):  # a fixed point: further iterations change nothing
            break
        table = updated
    return table


def _kmeans_error(u: torch.Tensor, weight: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Per table: sum of weight * (u - nearest value)^2."""
    return (weight * (u - table.gather(1, nearest(u, table))).square()).sum(1)


def _weighted_quantiles(u: torch.Tensor, weight: torch.Tensor, levels: int) -> torch.Tensor:
    order = u.argsort(dim=1)
    sorted_u, sorted_w = u.gather(1, order), weight.gather(1, order)
    cumulative = sorted_w.cumsum(1)
    targets = (torch.arange(levels, dtype=u.dtype) + 0.5) / levels * cumulative[:, -1:]
    index = torch.searchsorted(cumulative, targets.contiguous()).clamp(max=u.shape[1] - 1)
    return sorted_u.gather(1, index)


def nearest(u: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest table value for each u (tables ascending, one per row of u)."""
    midpoints = (table[:, 1:] + table[:, :-1]) / 2
    return torch.searchsorted(midpoints.contiguous(), u.contiguous())


def row_tables(table: torch.Tensor, rows: int, grid: LutGrid) -> torch.Tensor:
    """[tables, levels] -> [rows, levels]: the table each row reads."""
    return table.repeat_interleave(grid.table_rows, dim=0)[:rows]


def round_to(w: torch.Tensor, scale: torch.Tensor, table: torch.Tensor, grid: LutGrid) -> torch.Tensor:
    """Codes (uint8) of the nearest value scale * table[code] for every weight."""
    rows, cols = w.shape
    u = w.float() / spread(scale, cols, grid)
    return nearest(u, row_tables(table, rows, grid)).to(torch.uint8)


def values(codes: torch.Tensor, scale: torch.Tensor, table: torch.Tensor, grid: LutGrid) -> torch.Tensor:
    """scale * table[code], float32: what the loader computes from the stored float16 numbers."""
    rows, cols = codes.shape
    picked = row_tables(table.float(), rows, grid).gather(1, codes.long())
    return picked * spread(scale.float(), cols, grid)


def column_rounder(scale: torch.Tensor, tables: torch.Tensor, grid: LutGrid, codes_t: torch.Tensor):
    """GPTQ's round_column onto fixed scales and per-row tables [out, levels] (row_tables; ascending)
    for compressor.passes.gptq.error_feedback; the chosen codes are written to codes_t [in, out]."""
    cols = codes_t.shape[0]
    midpoints = ((tables[:, 1:] + tables[:, :-1]) / 2).contiguous()
    group_of = group_index(cols, grid.group_width(cols)).tolist()
    scale_t = scale.T.contiguous()

    def round_column(col: int, upcoming: torch.Tensor) -> torch.Tensor:
        s = scale_t[group_of[col]]
        code = torch.searchsorted(midpoints, (upcoming[0] / s).unsqueeze(1).contiguous())
        codes_t[col] = code.squeeze(1).to(torch.uint8)
        return tables.gather(1, code).squeeze(1) * s

    return round_column


def refit_tables(w: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, grid: LutGrid,
                 hessian: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """The float16 tables that minimise the layer's output error sum_r (w_r - v_r)^T H (w_r - v_r),
    given the codes and scales: v_r = A_r t with A_r[j, k] = scale[r, j] [code[r, j] = k], so each
    table is one least-squares solve of 2^bits unknowns (the normal equations of its rows summed)."""
    rows, cols = w.shape
    hessian = hessian.float()
    s = spread(scale.float(), cols, grid)
    target = w.float() @ hessian  # rows of H w
    system = torch.empty(rows, grid.levels, grid.levels)
    rhs = torch.empty(rows, grid.levels)
    for start in range(0, rows, chunk):
        part = slice(start, min(start + chunk, rows))
        a = torch.nn.functional.one_hot(codes[part].long(), grid.levels).float() * s[part, :, None]
        rhs[part] = torch.einsum("rjk,rj->rk", a, target[part])
        system[part] = torch.einsum("rjk,rjm->rkm", a, torch.einsum("ij,rjm->rim", hessian, a))
    tables = grid.num_tables(rows)
    pad = tables * grid.table_rows - rows
    if pad:  # the missing rows of the last table add nothing
        system = torch.cat([system, torch.zeros(pad, grid.levels, grid.levels)])
        rhs = torch.cat([rhs, torch.zeros(pad, grid.levels)])
    system = system.reshape(tables, grid.table_rows, grid.levels, grid.levels).sum(1)
    rhs = rhs.reshape(tables, grid.table_rows, grid.levels).sum(1)
    # A value no weight uses has an empty row: a small ridge keeps the solve defined (its value
    # then goes to 0, which changes no weight).
    diagonal = system.diagonal(dim1=1, dim2=2)
    ridge = 1e-6 * diagonal.abs().mean(-1, keepdim=True).clamp_min(1e-30)
    system = system + torch.diag_embed(ridge.expand_as(diagonal) + (diagonal == 0) * 1.0)
    return _half(torch.linalg.solve(system, rhs))


def sort_tables(table: torch.Tensor, codes: torch.Tensor, grid: LutGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """Tables in ascending order (what nearest-value rounding assumes) and the codes renumbered so
    every weight keeps its value."""
    table, order = table.sort(dim=1)
    new_code = order.argsort(dim=1)  # old position -> new position, per table
    rows = codes.shape[0]
    renumber = row_tables(new_code, rows, grid)
    return table, renumber.gather(1, codes.long()).to(torch.uint8)
