"""Mixed precision: budget accounting, importance allocation, the level database and EvoPress."""

from __future__ import annotations

import json
import random

import pytest
import torch

from compressor import budget
from compressor.errors import CompressorError
from compressor.grids import IntGrid
from compressor.passes import LinearState, Step, apply_steps
from compressor.search import evopress
from compressor.search.fitness import coarse_kl
from compressor.search.importance import (
    allocate_recipe,
    allocate_sparsity_recipe,
    lim_scores,
    two_level_allocation,
    zd_scores,
)
from compressor.stats import InputStats

# --- budget -----------------------------------------------------------------------------------

def test_parse_budget():
    assert budget.parse_budget("3.5bpw") == budget.Budget("bpw", 3.5)
    assert budget.parse_budget("0.5sparsity") == budget.Budget("sparsity", 0.5)
    assert budget.parse_budget(" 3.25 bits") == budget.Budget("bits", 3.25)
    for bad in ("3.5", "bpw", "1.2sparsity", "-1bpw", "3,5bpw"):
        with pytest.raises(CompressorError):
            budget.parse_budget(bad)


def test_linear_costs_hand_count():
    # 96 x 96 at 3 bits, groups of 32, asymmetric, fp32 scales (a tiny model in float32):
    # codes: 96 rows x ceil(96*3/32)=9 int32 words = 27,648 bits; scales 96 x 3 groups x 32 = 9,216;
    # int8 zero points (a mixed-precision checkpoint writes blocks) 96 x 3 x 8 = 2,304. Total 39,168
    # bits = 4.25 bits per weight; packed along the rows (one scheme) 3 groups x 9 words = 864 bits.
    grid = IntGrid(bits=3, group_size=32, symmetric=False)
    costs = budget.linear_costs(96, 96, grid, 32, kept=96 * 96)
    assert costs == {"bpw": 39168, "bits": 3 * 96 * 96, "sparsity": 96 * 96}
    assert budget.linear_costs(96, 96, grid, 32, kept=0, packed_zero=True)["bpw"] == 37728
    # Symmetric, bf16 scales, 576 columns in groups of 128 (ragged: 5 groups, the last of 64).
    grid = IntGrid(bits=4, group_size=128, symmetric=True)
    assert budget.linear_costs(10, 576, grid, 16, 0)["bpw"] == 10 * (576 * 4) + 10 * 5 * 16
    assert budget.linear_costs(4, 8, None, 16, kept=20) == {"bpw": 512, "bits": 512, "sparsity": 20}
    assert budget.budget_limit(budget.Budget("sparsity", 0.5), 1000) == 500
    assert budget.budget_limit(budget.Budget("bpw", 3.5), 1000) == 3500


# --- EvoPress ---------------------------------------------------------------------------------

def _space(limit_bits_per_weight: float) -> evopress.Space:
    """Units of three sizes, five integer bit levels; cost = numel * bits + a per-unit overhead."""
    sizes = [1000] * 6 + [3000] * 4 + [500] * 5
    costs = [[n * b + n // 10 for b in (2, 3, 4, 5, 6)] for n in sizes]
    return evopress.Space(costs=costs, limit=round(limit_bits_per_weight * sum(sizes)))


def test_mutation_keeps_the_total_exactly():
    space = _space(3.5)
    rng = random.Random(0)
    parent = evopress.initial_candidates(space, rng, tries=1)[0]
    total = space.total(parent)
    assert total <= space.limit
    moved = 0
    for _ in range(5000):
        child = evopress.mutate(parent, space, rng)
        assert space.total(child) == total
        assert all(0 <= lv < space.levels for lv in child)
        moved += child != parent
        parent = child
    assert moved > 4000  # the walk really explores


def test_initial_candidates_meet_the_budget():
    space = _space(3.37)
    starts = evopress.initial_candidates(space, random.Random(1), tries=5)
    assert len(starts) > 1
    for levels in starts:
        assert space.total(levels) <= space.limit
        assert set(levels) <= {1, 2}  # between the uniform 3-bit and 4-bit levels
        # Raising any one unit again would break the budget only if it is already tight.
    exact = _space(4.1)  # uniform 4 bits + the 0.1 overhead: met exactly by a uniform level
    assert evopress.initial_candidates(exact, random.Random(0), 3) == [[2] * 15]
    with pytest.raises(CompressorError):
        evopress.initial_candidates(_space(1.0), random.Random(0), 3)


def test_ranked_start_lowers_the_least_important_units():
    space = _space(3.37)
    importance = [0.3, 0.9, 0.1, 0.5, 0.7, 0.2, 0.8, 0.05, 0.6, 0.4, 0.35, 0.15, 0.95, 0.25, 0.45]
    levels = evopress.ranked_start(space, importance)
    assert space.total(levels) <= space.limit and set(levels) == {1, 2}
    lowered = [importance[u] for u, lv in enumerate(levels) if lv == 1]
    kept = [importance[u] for u, lv in enumerate(levels) if lv == 2]
    assert max(lowered) < min(kept)
    # Raising the most important lowered unit back would break the budget: no slack is wasted.
    unit = max((u for u, lv in enumerate(levels) if lv == 1), key=importance.__getitem__)
    assert space.total([lv + (u == unit) for u, lv in enumerate(levels)]) > space.limit


def test_start_takes_the_best_scoring_warm_start():
    space = _space(3.37)
    favourite = evopress.ranked_start(space, list(range(15)))

    def fitness(levels, windows):
        return sum(abs(a - b) for a, b in zip(levels, favourite, strict=True))

    settings = evopress.SearchSettings(stages=(evopress.Stage(1, 10),))
    state = evopress.start(space, fitness, 4, 10, settings, warm={"lim": favourite})
    assert state.parent == favourite and state.history[0]["start"] == "lim"
    assert state.parent_fitness == 0 and len(state.history[0]["starts"]) == 1 + settings.initial_tries


def test_stages_parse_and_reject():
    assert evopress.parse_stages("4x1024,1x4096") == (evopress.Stage(4, 1024), evopress.Stage(1, 4096))
    for bad in ("4x1024", "1x10,2x20", "ax3,1x2", "0x5,1x5"):
        with pytest.raises(CompressorError):
            evopress.parse_stages(bad)


def test_evolution_finds_the_known_optimum():
    """A synthetic fitness with a known best allocation: unit u's loss falls as 2^-bits * weight_u."""
    space = _space(3.5)
    weight = [0.1] * 6 + [5.0, 0.1, 0.1, 0.1] + [3.0, 3.0, 0.1, 0.1, 0.1]

    def fitness(levels, windows):
        return sum(w * 2.0 ** -(lv + 2) for w, lv in zip(weight, levels, strict=True))

    settings = evopress.SearchSettings(generations=150, offspring=8,
                                       stages=(evopress.Stage(2, 10), evopress.Stage(1, 10)))
    state = evopress.start(space, fitness, pool=4, seqlen=10, settings=settings)
    first = fitness(state.parent, [])
    for _ in range(settings.generations):
        state = evopress.generation(state, space, fitness, 4, 10, settings)
    assert space.total(state.parent) == space.total(evopress.start(space, fitness, 4, 10, settings).parent)
    assert fitness(state.parent, []) < 0.55 * first
    # A local optimum: no budget-keeping swap of one level between two same-size units improves it.
    final = fitness(state.parent, [])
    for units in space.size_groups:
        for up in units:
            for down in units:
                child = list(state.parent)
                child[up] += 1
                child[down] -= 1
                if up != down and child[up] < space.levels and child[down] >= 0:
                    assert fitness(child, []) >= final - 1e-12
    # The heavy units end at the top levels, light ones of the same size pay for them.
    assert state.parent[6] == 4 and state.parent[10] >= 3 and state.parent[11] >= 3
    # Monotone: the parent only ever changes for a better score on the same windows.
    assert all(h["fitness"] >= state.parent_fitness - 1e-12 for h in state.history[-1:])


def test_search_state_round_trips_through_json():
    space = _space(3.5)
    settings = evopress.SearchSettings(generations=3, offspring=4,
                                       stages=(evopress.Stage(2, 10), evopress.Stage(1, 20)))

    def fitness(levels, windows):
        return sum(levels) * 0.001 + sum(windows) * 1e-6 - levels[0] * 0.01

    state = evopress.start(space, fitness, 8, 10, settings)
    straight = state
    for _ in range(3):
        straight = evopress.generation(straight, space, fitness, 8, 10, settings)
    resumed = evopress.generation(state, space, fitness, 8, 10, settings)
    resumed = evopress.SearchState.from_data(json.loads(json.dumps(resumed.as_data())))
    for _ in range(2):
        resumed = evopress.generation(resumed, space, fitness, 8, 10, settings)
    assert resumed.parent == straight.parent and resumed.history == straight.history


# --- fitness ----------------------------------------------------------------------------------

def test_coarse_kl_is_exact_with_the_whole_vocabulary_and_a_lower_bound_otherwise():
    torch.manual_seed(0)
    logp = torch.log_softmax(torch.randn(7, 50) * 2, -1)
    logq = torch.log_softmax(torch.randn(7, 50) * 2, -1)
    full = (logp.exp() * (logp - logq)).sum(-1)
    top, where = logp.topk(50, -1)
    rest = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-7))
    assert torch.allclose(coarse_kl(top, rest, where, logq), full, atol=1e-4)
    top, where = logp.topk(5, -1)
    rest = torch.log1p(-top.exp().sum(-1))
    coarse = coarse_kl(top, rest, where, logq)
    assert (coarse <= full + 1e-5).all() and (coarse > 0).all()


# --- importance -------------------------------------------------------------------------------

def test_two_level_allocation_raises_the_most_important_first():
    scores = [0.1, 0.9, 0.5, 0.7]
    raised = two_level_allocation(scores, [10] * 4, [15] * 4, limit=40 + 10)
    assert raised == [False, True, False, True]
    assert two_level_allocation(scores, [10] * 4, [15] * 4, limit=40) == [False] * 4


def test_lim_scores_rank_an_identity_block_least_important(tokenizer):
    from tests.conftest import make_model

    model = make_model("llama")
    with torch.no_grad():  # block 1 adds nothing to the residual stream: input == output
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    ids = torch.randint(0, 300, (4, 16))
    scores = lim_scores(model, ids)
    assert scores[1] == pytest.approx(-1.0, abs=1e-5)
    assert scores[0] > scores[1]


def test_zd_scores_count_weights_beyond_one_sigma():
    from tests.conftest import make_model

    model = make_model("llama")
    with torch.no_grad():
        for linear in model.model.layers[0].modules():
            if isinstance(linear, torch.nn.Linear):
                # Two values, +-1: every weight sits exactly at one sigma, none beyond.
                sign = torch.ones(linear.weight.numel())
                sign[::2] = -1
                linear.weight.copy_(sign.view_as(linear.weight))
    scores = zd_scores(model)
    assert scores[0] == 0.0
    assert -0.5 < scores[1] < -0.2  # near-Gaussian init: about 32% beyond one sigma


def test_allocate_recipe_meets_a_fractional_target_exactly():
    from tests.conftest import make_model

    model = make_model("llama")  # 2 blocks of equal size: 3.5 bits = one block at 3, one at 4
    step = {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True}
    passes, info = allocate_recipe(model, step, budget.Budget("bits", 3.5), "zd", None)
    assert sorted(info["bits_per_block"]) == [3, 4] and info["achieved"] == 3.5
    assert {p["bits"] for p in passes} == {3, 4}
    most_important = max(range(2), key=lambda b: info["scores"][b])
    assert info["bits_per_block"][most_important] == 4
    with pytest.raises(CompressorError, match="nearest"):
        allocate_recipe(model, step, budget.Budget("bits", 3.3), "zd", None)
    with pytest.raises(CompressorError, match="cannot be met"):
        allocate_recipe(model, step, budget.Budget("bpw", 1.5), "zd", None)


def test_allocate_sparsity_spreads_the_target_exactly():
    from tests.conftest import make_model

    model = make_model("llama")  # 2 equal blocks: 0.5 = one block at 0.4, the other at 0.6
    passes, info = allocate_sparsity_recipe(model, {"method": "magnitude", "sparsity": 0.5}, "zd", None)
    assert sorted(info["sparsity_per_block"]) == [0.4, 0.6]
    most_important = max(range(2), key=lambda b: info["scores"][b])
    assert info["sparsity_per_block"][most_important] == 0.4
    assert {p["sparsity"] for p in passes} == {0.4, 0.6} and all(p["method"] == "magnitude" for p in passes)
    # Hand count: the linears' per-row pruned counts at 0.4 and 0.6 average to 0.5 exactly here.
    assert info["achieved"] == pytest.approx(0.5, abs=1e-12)
    for bad, message in [({"method": "magnitude", "pattern": "2:4"}, "N:M"),
                         ({"method": "magnitude", "sparsity": 0.05}, "spread")]:
        with pytest.raises(CompressorError, match=message):
            allocate_sparsity_recipe(model, bad, "zd", None)
    with pytest.raises(CompressorError, match="unknown importance"):
        allocate_sparsity_recipe(model, {"method": "magnitude", "sparsity": 0.5}, "xx", None)


def test_sparsify_allocate_lim(llama_dir, calibration_file, tmp_path, capsys, monkeypatch):
    from tests.test_cli import run_cli

    code, stdout, stderr = run_cli(
        ["sparsify", llama_dir, "--sparsity", "0.5", "--allocate", "lim", "--spread", "0.2",
         "--method", "wanda", "--dsnot", "--calibration", calibration_file, "--samples", "4",
         "--seqlen", "32", "-o", tmp_path / "s", "--json"], capsys, monkeypatch)
    assert code == 0, stderr
    summary = json.loads(stdout)
    decided = summary["recipe"]["allocation"]
    assert sorted(decided["sparsity_per_block"]) == [0.3, 0.7] and decided["score"] == "lim"
    for name, entry in summary["modules"].items():
        block = int(name.split(".layers.")[1].split(".")[0])
        assert entry["methods"] == ["wanda", "dsnot"]
        assert entry["sparsity"] == pytest.approx(decided["sparsity_per_block"][block], abs=0.02)
    code, _, stderr = run_cli(
        ["sparsify", llama_dir, "--pattern", "2:4", "--allocate", "zd", "-o", tmp_path / "b"],
        capsys, monkeypatch)
    assert code == 2 and "N:M" in stderr


# --- level database -----------------------------------------------------------------------------

def test_database_levels_equal_the_passes_run_directly(tmp_path):
    from compressor.search.database import LevelDatabase, build_database, quant_levels, sparsity_levels
    from tests.conftest import make_model

    model = make_model("qwen2")
    ids = torch.randint(0, 300, (6, 24))
    levels = quant_levels([2, 4], group_size=32, symmetric=False) + sparsity_levels(0.5, 0.5)
    database = build_database(model, ids, levels, tmp_path / "db")
    assert database.levels == ["w2", "w4", "s50.0", "dense"]
    assert len(database.groups) == 8
    assert database.groups[0] == [f"model.layers.0.self_attn.{n}_proj" for n in "qkv"]

    # Level w4 of block 0's [q, k, v] equals GPTQ run directly on the dense block's inputs.
    block = model.model.layers[0]
    stats = InputStats(96)
    captured = []
    handle = block.self_attn.q_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    model(input_ids=ids)
    handle.remove()
    stats.add_batch(torch.cat(captured))
    names = ["q_proj", "k_proj", "v_proj"]
    states = [LinearState(name=n, weight=getattr(block.self_attn, n).weight.float().clone(),
                          dtype=torch.float32) for n in names]
    apply_steps(states, [Step("gptq", {"bits": 4, "group_size": 32, "symmetric": False})], stats)
    for name, state in zip(names, states, strict=True):
        stored = database.state(f"model.layers.0.self_attn.{name}", 1)
        assert torch.equal(stored.quant.codes, state.quant.codes)
        assert torch.allclose(stored.weight, state.weight, atol=1e-6)
    sparse = database.state("model.layers.1.mlp.down_proj", 2)
    assert sparse.quant is None and (sparse.weight == 0).float().mean() == 0.5
    assert torch.equal(sparse.weight == 0, ~sparse.mask)
    dense = database.state("model.layers.1.mlp.down_proj", 3)
    assert torch.equal(dense.weight, model.model.layers[1].mlp.down_proj.weight)
    # Costs follow the budget module: 2 bits cost less than 4, sparsity counts kept weights.
    assert database.cost("model.layers.1.mlp.down_proj", 0, "bpw") < database.cost(
        "model.layers.1.mlp.down_proj", 1, "bpw")
    assert database.cost("model.layers.1.mlp.down_proj", 2, "sparsity") == 96 * 160 // 2
    # A rebuild in the same folder is a no-op resume; other settings are refused.
    again = build_database(model, ids, levels, tmp_path / "db")
    assert again.index["modules"] == LevelDatabase(tmp_path / "db").index["modules"]
    with pytest.raises(CompressorError, match="other settings"):
        build_database(model, ids, levels[:2], tmp_path / "db")


def test_database_on_a_reference_plan_holds_that_plans_sequential_result(tmp_path):
    """Calibrated on the activations of a reference plan, the database's entries at the plan's own
    levels are what the sequential pipeline makes of that plan, byte for byte; the other levels
    are calibrated on the same (compressed) activations; the model itself is left dense."""
    import copy

    from compressor.pipeline import compress_model
    from compressor.plan import build_plan
    from compressor.search.database import LevelDatabase, build_database, quant_levels
    from tests.conftest import make_model

    model = make_model("llama")
    dense_weights = {n: p.clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 300, (6, 24))
    levels = quant_levels([2, 4], group_size=32, symmetric=False)
    step = {"method": "gptq", "group_size": 32, "symmetric": False}
    reference = build_plan(model, [{**step, "bits": 2, "targets": [r"re:^model\.layers\.0\."]},
                                   {**step, "bits": 4, "targets": [r"re:^model\.layers\.1\."]}])
    database = build_database(model, ids, levels, tmp_path / "db", reference=reference)
    assert all(torch.equal(p, dense_weights[n]) for n, p in model.named_parameters())

    sequential = copy.deepcopy(model)
    records = compress_model(sequential, reference, ids)
    for name, steps in reference.items():
        stored = database.state(name, 0 if steps[0].args["bits"] == 2 else 1)
        assert torch.equal(stored.quant.codes, records[name].quant.codes), name
        assert torch.equal(stored.weight, sequential.get_submodule(name).weight), name

    # The reference is a start of the search where it fits the budget: w2 (level 0) for block 0's
    # four units, w4 (level 1) for block 1's.
    from compressor.search.run import reference_start, search_space, units_of
    units = units_of(database, "fused")
    space, _ = search_space(database, units, budget.Budget("bpw", 4.5))
    assert reference_start(database, units, space) == [0] * 4 + [1] * 4
    space, _ = search_space(database, units, budget.Budget("bpw", 4.0))  # the plan costs 4.25
    assert reference_start(database, units, space) is None

    # Block 0's first sub-group sees the embeddings either way; block 1 sees block 0 at 2 bits.
    dense = build_database(model, ids, levels, tmp_path / "dense")
    first, later = "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"
    assert torch.equal(dense.state(first, 1).quant.codes, database.state(first, 1).quant.codes)
    assert not torch.equal(dense.state(later, 1).quant.codes, database.state(later, 1).quant.codes)

    # An interrupted build resumes at the next block and ends with the same files.
    def stop_after_first(done, total):
        if done == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_database(model, ids, levels, tmp_path / "resumed", on_block=stop_after_first,
                       reference=reference)
    assert list(LevelDatabase(tmp_path / "resumed").index["blocks"]) == ["000"]
    resumed = build_database(model, ids, levels, tmp_path / "resumed", reference=reference)
    assert resumed.index == database.index
    for file in database.index["blocks"].values():
        assert (tmp_path / "resumed" / file).read_bytes() == (tmp_path / "db" / file).read_bytes()
    with pytest.raises(CompressorError, match="other settings"):  # another reference, another database
        build_database(model, ids, levels, tmp_path / "db")


# --- end to end ---------------------------------------------------------------------------------

SEARCH_ARGS = ["--budget", "3.5bpw", "--group-size", "32", "--bits-levels", "2,3,4", "--samples", "4",
               "--seqlen", "32", "--fitness-windows", "6", "--fitness-seqlen", "32",
               "--stages", "2x64,1x96", "--generations", "4", "--offspring", "3", "--json"]


def test_search_writes_a_loadable_checkpoint_and_resumes_identically(
        llama_dir, calibration_file, tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM

    from compressor.search.database import LevelDatabase
    from tests.test_cli import run_cli

    args = ["search", llama_dir, *SEARCH_ARGS, "--calibration", calibration_file]
    code, stdout, stderr = run_cli([*args, "-o", tmp_path / "a"], capsys, monkeypatch)
    assert code == 0, stderr
    summary = json.loads(stdout)
    found = summary["search"]
    assert found["generations"] == 4 and len(found["history"]) == 5
    # Generation 0 chose among the importance allocations and random starts, all scored.
    first = found["history"][0]
    assert first["generation"] == 0 and "lim" in first["starts"] and "random-0" in first["starts"]
    assert first["starts"][first["start"]] == min(first["starts"].values())
    assert found["achieved"] <= 3.5 and summary["bpw"]["stored"] == pytest.approx(found["achieved"])
    levels = found["per_module_level"]
    # Fused groups share a level: q, k, v together and gate, up together.
    for block in (0, 1):
        attn = {levels[f"model.layers.{block}.self_attn.{n}_proj"] for n in "qkv"}
        mlp = {levels[f"model.layers.{block}.mlp.{n}_proj"] for n in ("gate", "up")}
        assert len(attn) == 1 and len(mlp) == 1

    # The checkpoint loads in transformers and computes what the database's levels compute.
    database = LevelDatabase(tmp_path / "a.search" / "database")
    expected = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    with torch.no_grad():
        for name, level in levels.items():
            expected.get_submodule(name).weight.copy_(database.weight(name, database.levels.index(level)))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a").eval()
    ids = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, expected(ids).logits, atol=1e-4)
    assert (tmp_path / "a" / "levels.svg").read_text().startswith("<svg")
    assert "targets" in (tmp_path / "a" / "recipe.yaml").read_text()

    # --assemble requantize re-runs the winning plan through the sequential pipeline: the same
    # bytes as `compress run` of the recipe it wrote, on the same calibration.
    code, stdout, stderr = run_cli([*args, "--assemble", "requantize", "-o", tmp_path / "c"], capsys,
                                   monkeypatch)
    assert code == 0, stderr
    assert json.loads(stdout)["search"]["assembled"] == "requantize"
    assert json.loads(stdout)["search"]["per_module_level"] == levels
    code, _, stderr = run_cli(["run", tmp_path / "c" / "recipe.yaml", llama_dir, "--calibration",
                               calibration_file, "--samples", "4", "--seqlen", "32", "-o", tmp_path / "d"],
                              capsys, monkeypatch)
    assert code == 0, stderr
    requantized = [(tmp_path / run / "model.safetensors").read_bytes() for run in ("c", "d")]
    assert requantized[0] == requantized[1]
    assert requantized[0] != (tmp_path / "a" / "model.safetensors").read_bytes()

    # Interrupted after two generations, then resumed: the same checkpoint, byte for byte.
    import compressor.search.evopress as evo

    real, calls = evo.generation, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(evo, "generation", flaky)
    code, _, _ = run_cli([*args, "-o", tmp_path / "b"], capsys, monkeypatch)
    assert code == 130 and not (tmp_path / "b").exists()
    monkeypatch.setattr(evo, "generation", real)
    code, stdout, stderr = run_cli(["search", "--resume", tmp_path / "b", "--json"], capsys, monkeypatch)
    assert code == 0, stderr
    assert json.loads(stdout)["search"]["history"] == found["history"]
    weights = [(tmp_path / run / "model.safetensors").read_bytes() for run in ("a", "b")]
    assert weights[0] == weights[1]


@pytest.mark.parametrize("extra, message", [
    (["--budget", "0.5bpw"], "cannot be met"),
    (["--budget", "3.5"], "not understood"),
    (["--budget", "0.5sparsity"], "needs --levels sparsity"),
    (["--budget", "3bpw", "--bits-levels", "2,9"], "from 2 to 8"),
    (["--budget", "3bpw", "--stages", "2x10"], "last selection stage"),
    (["--budget", "3bpw", "--granularity", "layer"], "granularity"),
    (["--budget", "3bpw", "--fitness-dtype", "float16"], "--fitness-dtype"),
    (["--budget", "3bpw", "--database-reference", "random"], "--database-reference"),
    ([], "give a --budget"),
])
def test_search_bad_input(llama_dir, calibration_file, tmp_path, capsys, monkeypatch, extra, message):
    from tests.test_cli import run_cli

    code, _, stderr = run_cli(["search", llama_dir, "--calibration", calibration_file, "--samples", "4",
                               "--seqlen", "32", "-o", tmp_path / "x", *extra], capsys, monkeypatch)
    assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_sparsity_search_writes_the_chosen_sparse_weights(llama_dir, calibration_file, tmp_path, capsys,
                                                          monkeypatch):
    """The search leaves the model dense, so a float (sparse-only) level must reach the checkpoint from
    the database, not from the module (the bug: a dense model written under a 50% manifest)."""
    from transformers import AutoModelForCausalLM

    from compressor.search.database import LevelDatabase
    from tests.test_cli import run_cli

    args = ["search", llama_dir, "--budget", "0.5sparsity", "--levels", "sparsity", "--sparsity-step", "0.2",
            *SEARCH_ARGS[2:], "--calibration", calibration_file, "-o", tmp_path / "s"]
    code, stdout, stderr = run_cli(args, capsys, monkeypatch)
    assert code == 0, stderr
    levels = json.loads(stdout)["search"]["per_module_level"]
    database = LevelDatabase(tmp_path / "s.search" / "database")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()
    dense = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    zeros = total = 0
    for name, level in levels.items():
        written = loaded.get_submodule(name).weight
        assert torch.equal(written, database.weight(name, database.levels.index(level)).to(written.dtype))
        zeros += int((written == 0).sum())
        total += written.numel()
    assert 0.45 <= zeros / total <= 0.5
    ids = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        assert not torch.allclose(loaded(ids).logits, dense(ids).logits, atol=1e-3)


def test_resume_without_a_search(tmp_path, capsys, monkeypatch):
    from tests.test_cli import run_cli

    code, _, stderr = run_cli(["search", "--resume", tmp_path / "nothing"], capsys, monkeypatch)
    assert code == 2 and "nothing to resume" in stderr


def test_quantize_allocate_lim(llama_dir, calibration_file, tmp_path, capsys, monkeypatch):
    from tests.test_cli import run_cli

    code, stdout, stderr = run_cli(
        ["quantize", llama_dir, "--bits", "3.5", "--allocate", "lim", "--group-size", "32", "--method", "rtn",
         "--calibration", calibration_file, "--samples", "4", "--seqlen", "32", "-o", tmp_path / "m",
         "--json"], capsys, monkeypatch)
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["bpw"]["levels"] == 3.5
    decided = summary["recipe"]["allocation"]
    assert sorted(decided["bits_per_block"]) == [3, 4] and decided["score"] == "lim"
    bits = {name: m["bits"] for name, m in summary["modules"].items()}
    assert {b for n, b in bits.items() if ".layers.0." in n} == {decided["bits_per_block"][0]}
    refused = [(["--bits", "3.5"], "needs --allocate"), (["--bits", "3.3", "--allocate", "zd"], "nearest"),
               (["--allocate", "xx", "--bits", "3.5"], "unknown importance")]
    for bad, message in refused:
        code, _, stderr = run_cli(["quantize", llama_dir, *bad, "--method", "rtn", "--group-size", "32",
                                   "-o", tmp_path / "bad"], capsys, monkeypatch)
        assert code == 2 and message in stderr, stderr


def test_sparsity_levels_keep_the_kept_count_exact_under_mutation(tmp_path):
    from compressor.search.database import build_database, sparsity_levels
    from compressor.search.run import search_space, units_of
    from tests.conftest import make_model

    model = make_model("llama")  # input widths 96 and 160: steps snap to multiples of 1/32
    levels = sparsity_levels(0.1, 0.9, widths=[96, 160])
    assert levels[-2].steps[0].args["sparsity"] == 3 / 32 and levels[-1].name == "dense"
    database = build_database(model, torch.randint(0, 300, (4, 16)), levels, tmp_path / "db")
    for granularity in ("fused", "module"):
        units = units_of(database, granularity)
        space, weights = search_space(database, units, budget.Budget("sparsity", 0.5))
        rng = random.Random(0)
        parent = evopress.initial_candidates(space, rng, 1)[0]
        total = space.total(parent)
        assert total <= space.limit and 1 - total / weights >= 0.5
        for _ in range(2000):
            parent = evopress.mutate(parent, space, rng)
            assert space.total(parent) == total
    with pytest.raises(CompressorError, match="cannot be met"):
        search_space(database, units, budget.Budget("sparsity", 0.95))


def test_integer_programme_equals_brute_force():
    """AdaQuant's knapsack, solved by the DP, against every combination of a small instance."""
    import itertools

    from compressor.search import ip

    rng = random.Random(3)
    for trial in range(30):
        units, levels = rng.randint(1, 5), rng.randint(2, 4)
        costs = []
        for _ in range(units):
            row = sorted(rng.choice([6, 9, 12, 15, 21, 30, 33]) * rng.randint(1, 3) for _ in range(levels))
            costs.append(row)
        deltas = [sorted((rng.random() for _ in range(levels)), reverse=True) for _ in range(units)]
        if trial % 3 == 0:  # noisy measurements: not monotone in the level
            deltas = [[rng.random() - 0.3 for _ in range(levels)] for _ in range(units)]
        low, high = sum(min(r) for r in costs), sum(max(r) for r in costs)
        limit = rng.randint(low, high)
        chosen = ip.solve(costs, deltas, limit)
        best = min(sum(d[c] for d, c in zip(deltas, combo, strict=True))
                   for combo in itertools.product(range(levels), repeat=units)
                   if sum(r[c] for r, c in zip(costs, combo, strict=True)) <= limit)
        assert sum(r[c] for r, c in zip(costs, chosen, strict=True)) <= limit
        assert sum(d[c] for d, c in zip(deltas, chosen, strict=True)) == pytest.approx(best)
    with pytest.raises(CompressorError, match="no allocation fits"):
        ip.solve([[5, 6]], [[1.0, 0.0]], 4)


def test_integer_programme_deltas_measure_one_unit_at_a_time():
    from compressor.search import ip

    calls = []

    def fitness(levels, windows):  # additive by construction: unit u at level l costs (2 - l) * (u + 1)
        calls.append(list(levels))
        return sum((2 - lv) * (u + 1) for u, lv in enumerate(levels)) + 0.5

    space = evopress.Space(costs=[[1, 2, 3]] * 3, limit=6)
    saved = []
    deltas = ip.measure_deltas(fitness, space, [0], done=[[2.0, 1.0, 0.0]], on_unit=lambda rows: saved.append(
        len(rows)))
    assert deltas == [[2.0, 1.0, 0.0], [4.0, 2.0, 0.0], [6.0, 3.0, 0.0]]
    assert saved == [2, 3] and calls[0] == [2, 2, 2] and calls[1] == [2, 0, 2] and calls[-1] == [2, 2, 1]
    assert len(calls) == 1 + 2 * 2  # the baseline, then each unit not yet measured at each lower level
    assert ip.solve(space.costs, deltas, space.limit) == [0, 1, 2]  # the least sensitive unit goes lowest


def test_quantize_allocate_ip_writes_the_programmes_choice_and_resumes(
        llama_dir, calibration_file, tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM

    from compressor.search import ip
    from tests.test_cli import run_cli

    args = ["quantize", llama_dir, "--budget", "3.5bpw", "--allocate", "ip", "--group-size", "32",
            "--calibration", calibration_file, "--samples", "4", "--seqlen", "32", "--json"]
    code, stdout, stderr = run_cli([*args, "-o", tmp_path / "a"], capsys, monkeypatch)
    assert code == 0, stderr
    summary = json.loads(stdout)
    found = summary["search"]
    assert found["algorithm"] == "ip" and found["achieved"] <= 3.5
    assert summary["bpw"]["stored"] == pytest.approx(found["achieved"])
    deltas = found["history"][0]["deltas"]
    assert all(row[-1] == 0.0 for row in deltas) and len(deltas) == found["units"]
    assert any(row[0] > 0 for row in deltas)  # 2 bits hurts somewhere
    # The chosen levels are the solver's optimum for the measured deltas.
    levels = found["levels"]
    per_module = found["per_module_level"]
    assert found["achieved"] > 2.5 and len(set(per_module.values())) >= 2
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "a") is not None

    # Interrupted while measuring, then resumed: the same checkpoint, byte for byte.
    real, calls = ip.measure_deltas, []

    def interrupted(fitness, space, windows, done=None, on_unit=None):
        def stop(rows):
            on_unit(rows)
            if len(rows) == 3:
                raise KeyboardInterrupt
        return real(fitness, space, windows, done, stop)

    monkeypatch.setattr(ip, "measure_deltas", interrupted)
    code, _, _ = run_cli([*args, "-o", tmp_path / "b"], capsys, monkeypatch)
    assert code == 130 and not (tmp_path / "b").exists()
    monkeypatch.setattr(ip, "measure_deltas", lambda *a, **k: calls.append(len(a[3])) or real(*a, **k))
    code, stdout, stderr = run_cli([*args, "-o", tmp_path / "b", "--resume"], capsys, monkeypatch)
    assert code == 0, stderr
    assert calls == [3]  # only the units not yet measured
    assert json.loads(stdout)["search"]["history"][0]["deltas"] == deltas
    weights = [(tmp_path / run / "model.safetensors").read_bytes() for run in ("a", "b")]
    assert weights[0] == weights[1]
    assert levels == ["w2", "w3", "w4", "w5", "w6"]


def test_fitness_from_a_cached_prefix_equals_the_full_forward(tmp_path):
    """The integer programme's shortcut: after prefix_from(baseline), a candidate differing from
    block b on runs only from block b, and scores exactly what the whole forward scores."""
    from compressor.search.database import build_database, quant_levels
    from compressor.search.fitness import DenseTargets, KLFitness
    from tests.conftest import make_model

    model = make_model("llama")
    ids = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(0))
    database = build_database(model, ids, quant_levels([2, 4], group_size=32), tmp_path / "db")
    units = [[name] for group in database.groups for name in group]
    targets = DenseTargets(model, ids[:3], top_k=16, device=torch.device("cpu"))
    fitness = KLFitness(model, database, units, targets)
    windows = [0, 2]
    top = [1] * len(units)
    calls = []
    for index in range(len(fitness.blocks)):
        fitness.blocks[index].register_forward_pre_hook(lambda m, a, i=index: calls.append(i))
    base_full = fitness(top, windows)
    assert fitness.prefix_from(top, windows) == base_full
    last = len(units) - 1
    for unit in (0, last):
        levels = list(top)
        levels[unit] = 0
        calls.clear()
        cached = fitness(levels, windows)
        ran = set(calls)
        saved, fitness.cached_levels = fitness.cached_levels, None
        full = fitness(levels, windows)
        fitness.cached_levels = saved
        assert cached == full and full > base_full
        assert ran == set(range(fitness.unit_block[unit], len(fitness.blocks)))
    assert fitness(top, windows) == base_full
