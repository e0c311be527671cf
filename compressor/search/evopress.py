"""EvoPress (Sieberling et al., 2024): (1 + lambda) evolutionary search of per-unit compression levels.

The search sees only integers: a candidate is a level index per unit (a fused group of linears, or
one linear), each (unit, level) has an integer cost, and the total must stay within a limit. Fitness
is a callable (lower is better, KL to the dense model in practice) evaluated on sampled windows.

Start: the best-scoring of a few random descents from the uniform level above the budget and of
the importance heuristics' allocations (warm starts), so the search refines the best of them.

One generation:
    offspring = distinct mutations of the parent (each keeps the total cost exactly)
    for each stage (survivors, tokens): draw fresh windows, score the candidates on them, keep the best
    the parent joins the last stage; the winner is the next parent

All randomness comes from one random.Random whose state is saved with the search state after every
generation, so a resumed search continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from compressor.errors import CompressorError


@dataclass(frozen=True)
class Stage:
    survivors: int
    tokens: int


def parse_stages(text: str) -> tuple[Stage, ...]:
    """'4x1024,1x4096': keep 4 after scoring on 1024 tokens, then 1 after 4096 tokens."""
    stages = []
    for part in text.split(","):
        try:
            survivors, tokens = (int(x) for x in part.strip().lower().split("x"))
        except ValueError:
            raise CompressorError(f"stage {part!r} not understood; write SURVIVORSxTOKENS, e.g. 4x1024")
        if survivors < 1 or tokens < 1:
            raise CompressorError(f"stage {part!r}: survivors and tokens must be positive")
        stages.append(Stage(survivors, tokens))
    if not stages or stages[-1].survivors != 1:
        raise CompressorError("the last selection stage must keep exactly 1 candidate (e.g. ...,1x4096)")
    if any(b.survivors > a.survivors for a, b in zip(stages, stages[1:], strict=False)):
        raise CompressorError("each selection stage must keep at most as many candidates as the one before")
    return tuple(stages)


@dataclass(frozen=True)
class SearchSettings:
    generations: int = 30  # fits the 3.5 bpw SmolLM2 search (database included) in 30 min on 2 cores
    offspring: int = 12
    # The last stage decides whether the parent is replaced: 8192 tokens keep that choice from
    # following noise (the reference uses 131072 on a GPU).
    stages: tuple[Stage, ...] = (Stage(3, 1024), Stage(1, 8192))
    max_flips: int = 3  # level switches per mutation: min(U{1..max}, U{1..max}) as in EvoPress
    initial_tries: int = 4  # random starts when the budget lies between two uniform levels
    seed: int = 0

    def as_data(self) -> dict:
        return {**asdict(self), "stages": [asdict(s) for s in self.stages]}


@dataclass
class Space:
    """Per-unit level costs (cheapest level first) and the total cost a candidate may not exceed."""

    costs: list[list[int]]  # [unit][level]
    limit: int

    def __post_init__(self):
        for unit, row in enumerate(self.costs):
            if any(b < a for a, b in zip(row, row[1:], strict=False)):
                raise CompressorError(f"unit {unit}: level costs must not decrease: {row}")
        # Units with identical cost rows can trade levels without changing the total.
        by_row: dict[tuple, list[int]] = {}
        for unit, row in enumerate(self.costs):
            by_row.setdefault(tuple(row), []).append(unit)
        self.size_groups = [units for units in by_row.values() if len(units) > 1]

    @property
    def levels(self) -> int:
        return len(self.costs[0])

    def total(self, levels: list[int]) -> int:
        return sum(row[level] for row, level in zip(self.costs, levels, strict=True))

    def uniform_total(self, level: int) -> int:
        return sum(row[level] for row in self.costs)


def descend(space: Space, order: list[int]) -> list[int]:
    """From the cheapest uniform level that reaches the limit, lower units one level each, in
    `order`, until the total fits: a start between two neighbouring uniform levels."""
    top = space.levels - 1
    ceil = next((lv for lv in range(space.levels) if space.uniform_total(lv) >= space.limit), top)
    levels = [ceil] * len(space.costs)
    total = space.total(levels)
    for unit in order:
        if total <= space.limit or ceil == 0:
            break
        total -= space.costs[unit][ceil] - space.costs[unit][ceil - 1]
        levels[unit] -= 1
    return levels


def initial_candidates(space: Space, rng: random.Random, tries: int) -> list[list[int]]:
    """Starting points within budget: a uniform level that fits exactly, else random descents.

    Random units are lowered from the cheapest uniform level that reaches the limit until the
    total fits (EvoPress's start for fractional targets); several such starts.
    """
    if space.uniform_total(0) > space.limit:
        raise CompressorError("budget below the cheapest level")  # callers word it for the user
    units = len(space.costs)
    starts = []
    for _ in range(max(1, tries)):
        levels = descend(space, rng.sample(range(units), units))
        if levels not in starts:
            starts.append(levels)
        if len(set(levels)) == 1:  # a uniform level fits: every descent gives the same start
            break
    return starts


def ranked_start(space: Space, importance: list[float]) -> list[int]:
    """The importance heuristics' allocation in the search space: the least important units are
    the ones lowered (LIM / ZD scores per unit, higher = more important)."""
    return descend(space, sorted(range(len(space.costs)), key=importance.__getitem__))


def mutate(parent: list[int], space: Space, rng: random.Random, max_flips: int = 3,
           attempts: int = 100) -> list[int]:
    """Level switches that keep the total cost exactly: one unit up a level, another of the same
    size group down a level, accepted only when the two cost steps are equal."""
    child = list(parent)
    flips = min(rng.randint(1, max_flips), rng.randint(1, max_flips))
    for _ in range(flips):
        for _ in range(attempts):
            if not space.size_groups:
                return child
            units = rng.choice(space.size_groups)
            up, down = rng.sample(units, 2)
            if child[up] + 1 >= space.levels or child[down] == 0:
                continue
            raise_cost = space.costs[up][child[up] + 1] - space.costs[up][child[up]]
            lower_cost = space.costs[down][child[down]] - space.costs[down][child[down] - 1]
            if raise_cost != lower_cost:
                continue
            child[up] += 1
            child[down] -= 1
            break
    return child


@dataclass
class SearchState:
    """Everything a resumed search needs; saved after every generation."""

    generation: int
    parent: list[int]
    parent_fitness: float | None
    rng_state: list
    evaluations: int = 0
    history: list[dict] = field(default_factory=list)

    def as_data(self) -> dict:
        return asdict(self)

    @classmethod
    def from_data(cls, data: dict) -> SearchState:
        return cls(**data)

    def rng(self) -> random.Random:
        rng = random.Random()
        version, internal, gauss = self.rng_state
        rng.setstate((version, tuple(internal), gauss))
        return rng


def _rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


Fitness = Callable[[list[int], list[int]], float]  # (levels, window indices) -> loss, lower is better


def _windows(rng: random.Random, pool: int, tokens: int, seqlen: int) -> list[int]:
    count = min(pool, max(1, -(-tokens // seqlen)))
    return sorted(rng.sample(range(pool), count))


def start(space: Space, fitness: Fitness, pool: int, seqlen: int, settings: SearchSettings,
          warm: dict[str, list[int]] | None = None) -> SearchState:
    """Pick the best start, scored on the last stage's token count: random descents and the named
    warm starts (importance allocations), so the search begins no worse than those heuristics."""
    rng = random.Random(settings.seed)
    named = dict(warm or {})
    for number, levels in enumerate(initial_candidates(space, rng, settings.initial_tries)):
        named.setdefault(f"random-{number}", levels)
    names = [name for number, name in enumerate(named)
             if named[name] not in [named[other] for other in list(named)[:number]]]
    for name in names:
        if space.total(named[name]) > space.limit:
            raise CompressorError(f"start {name!r} exceeds the budget")
    scores = {names[0]: None}
    if len(names) > 1:
        windows = _windows(rng, pool, settings.stages[-1].tokens, seqlen)
        scores = {name: fitness(named[name], windows) for name in names}
    best = min(names, key=lambda name: scores[name] or 0.0)
    history = [{"generation": 0, "start": best, "starts": scores}]
    return SearchState(generation=0, parent=named[best], parent_fitness=scores[best],
                       rng_state=_rng_state(rng), evaluations=len(names) if len(names) > 1 else 0,
                       history=history)


def generation(state: SearchState, space: Space, fitness: Fitness, pool: int, seqlen: int,
               settings: SearchSettings) -> SearchState:
    """One (1 + lambda) generation with multi-stage selection; returns the next state."""
    rng = state.rng()
    offspring: list[list[int]] = []
    for _ in range(settings.offspring * 10):  # duplicates (and the parent itself) are dropped
        child = mutate(state.parent, space, rng, settings.max_flips)
        if child != state.parent and child not in offspring:
            offspring.append(child)
        if len(offspring) == settings.offspring:
            break
    candidates = offspring
    evaluations = state.evaluations
    scores: list[float] = []
    for number, stage in enumerate(settings.stages):
        if number == len(settings.stages) - 1:
            candidates = candidates + [state.parent]
        windows = _windows(rng, pool, stage.tokens, seqlen)
        scores = [fitness(levels, windows) for levels in candidates]
        evaluations += len(candidates)
        order = sorted(range(len(candidates)), key=scores.__getitem__)[: stage.survivors]
        candidates = [candidates[i] for i in order]
        scores = [scores[i] for i in order]
    parent, best = candidates[0], scores[0]
    history = state.history + [{"generation": state.generation + 1, "fitness": best,
                                "changed": parent != state.parent}]
    return SearchState(generation=state.generation + 1, parent=parent, parent_fitness=best,
                       rng_state=_rng_state(rng), evaluations=evaluations, history=history)
