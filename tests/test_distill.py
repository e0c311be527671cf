"""`compress distill`: straight-through gradients, the KD loss, students that keep their format,
resume, training text apart from the evaluation text, and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from compressor import data, grids, students
from compressor.distill import DistillOptions, distill, distillation_loss, learning_rate_factor
from compressor.grids import IntGrid
from compressor.model import load_model, resolve_source
from compressor.passes import LinearState, QuantizedWeight
from compressor.sparsity import Pattern, mask_holds
from compressor.teacher import top_k_distillation_loss
from tests.conftest import data_dir
from tests.test_cli import run_cli

SMALL = dict(seqlen=32, batch=2, eval_every=2, heldout=2, save_every=2)


# -- straight-through estimators against analytic gradients -----------------------------------------
def test_ternary_forward_and_straight_through_gradient():
    torch.manual_seed(0)
    w = torch.randn(6, 8)
    unit = students.TernaryUnit(w, "absmean")
    latent = unit.params["weight"].requires_grad_()
    out = unit.weight()
    s = w.abs().mean()
    assert torch.allclose(out.detach(), torch.clamp(torch.round(w / s), -1, 1) * s, atol=1e-6)
    upstream = torch.randn_like(w)
    (grad,) = torch.autograd.grad((out * upstream).sum(), latent)
    assert torch.allclose(grad, upstream)  # d(ste(w))/dw = 1
    median = students.TernaryUnit(w, "median", per_channel=True)
    assert torch.allclose(median.scale(w)[:, 0], w.abs().median(dim=1).values)


def test_ternary_ramp_phases_the_grid_in_with_an_identity_gradient():
    torch.manual_seed(0)
    w = torch.randn(6, 8)
    ternary = torch.clamp(torch.round(w / w.abs().mean()), -1, 1) * w.abs().mean()
    unit = students.TernaryUnit(w, "absmean", ramp=0.5)
    assert torch.equal(unit.weight().detach(), w)  # before the first step: still the dense weight
    unit.update(0.2)
    latent = unit.params["weight"].requires_grad_()
    out = unit.weight()
    assert torch.allclose(out.detach(), w + 0.4 * (ternary - w), atol=1e-6)
    upstream = torch.randn_like(w)
    (grad,) = torch.autograd.grad((out * upstream).sum(), latent)
    assert torch.allclose(grad, upstream)
    unit.update(0.5)
    assert torch.allclose(unit.weight().detach(), ternary, atol=1e-6)  # on the grid from `ramp` on
    x = torch.tensor([[0.5, -1.0, 0.3]])
    half = students.quantize_activations(x, 4, mix=0.5)
    assert torch.allclose(half, (x + students.quantize_activations(x, 4)) / 2)


def test_integer_grid_straight_through_gradients_match_the_analytic_ones():
    """w = s0 r (clamp(round(u) + z0) - z): dL/du = s0 r dL/dw inside the grid (0 where clamped), and
    dL/dr = sum over the group of s0 (q - z) dL/dw: the codes' own, not 0 as LSQ's is on the grid."""
    torch.manual_seed(0)
    grid = IntGrid(bits=3, group_size=4, symmetric=False)
    w = torch.randn(3, 8)
    scale, zero = grids.choose_qparams(w, grid)
    codes = grids.quantize(w, scale, zero, grid)
    state = LinearState("x", grids.dequantize(codes, scale, zero, grid), torch.float32,
                        quant=QuantizedWeight(grid=grid, codes=codes, scale=scale, zero=zero))
    unit = students.make_unit(state, "params")
    assert torch.equal(unit.weight().detach(), state.weight)  # starts on the stored grid exactly
    units, multiplier = unit.params["units"].requires_grad_(), unit.params["range"].requires_grad_()
    with torch.no_grad():
        units.add_(torch.randn_like(units) * 2)  # some codes now clamp
    index = grids.group_index(8, 4)
    upstream = torch.randn_like(w)
    grad_units, grad_range = torch.autograd.grad((unit.weight() * upstream).sum(), [units, multiplier])
    raw = torch.round(units.detach()) + zero[:, index]
    inside = (raw >= 0) & (raw <= grid.maxq)
    assert (~inside).any() and inside.any()
    assert torch.allclose(grad_units, torch.where(inside, scale[:, index] * upstream, torch.zeros_like(w)))
    q = raw.clamp(0, grid.maxq)
    expected = torch.zeros_like(scale).index_add_(1, index, scale[:, index] * (q - zero[:, index]) * upstream)
    assert torch.allclose(grad_range, expected, atol=1e-5)
    frozen = students.make_unit(state, "scales")
    assert "units" not in frozen.params and set(frozen.params) == {"range", "zero"}


def test_activation_quantization_is_absmax_per_token_with_identity_gradient():
    x = torch.tensor([[0.5, -1.0, 0.25], [2.0, 0.1, -0.3]], requires_grad=True)
    q = students.quantize_activations(x, 8)
    step = x.detach().abs().amax(-1, keepdim=True) / 127
    assert torch.allclose(q.detach(), torch.round(x.detach() / step) * step)
    (grad,) = torch.autograd.grad(q.sum(), x)
    assert torch.equal(grad, torch.ones_like(x))


def test_srste_gradient_adds_the_decay_on_pruned_weights():
    torch.manual_seed(0)
    w = torch.randn(4, 8)
    unit = students.SparseTrainUnit(w, Pattern(sparsity=0.5, kept=2, block=4), "srste")
    latent = unit.params["weight"].requires_grad_()
    out = unit.weight()
    assert torch.equal(out.detach(), w * unit.mask) and mask_holds(unit.mask, Pattern(0.5, 2, 4))
    upstream = torch.randn_like(w)
    (grad,) = torch.autograd.grad((out * upstream).sum(), latent)
    assert torch.allclose(grad, upstream + unit.SRSTE_DECAY * w * ~unit.mask)


def test_pgf_factor_fades_the_pruned_weights():
    torch.manual_seed(0)
    w = torch.randn(4, 8)
    unit = students.SparseTrainUnit(w, Pattern(0.5, 2, 4), "pgf")
    assert torch.equal(unit.weight().detach(), w)  # factor 1 at the start
    unit.update(0.375)  # halfway to the default end (0.75), linear
    assert unit.factor == pytest.approx(0.5)
    expected = torch.where(unit.mask, w, 0.5 * w)
    assert torch.allclose(unit.weight().detach(), expected)
    unit.update(0.8)
    assert unit.factor == 0 and torch.equal(unit.weight().detach(), w * unit.mask)
    assert students.pgf_factor(0.0, "exp", 0.75) == 1.0 and 0 < students.pgf_factor(0.7, "exp", 0.75) < 0.01


def test_lora_starts_at_the_student_along_the_quantization_error():
    torch.manual_seed(0)
    teacher = torch.randn(8, 12)
    grid = IntGrid(bits=2, group_size=4, symmetric=False)
    scale, zero = grids.choose_qparams(teacher, grid)
    codes = grids.quantize(teacher, scale, zero, grid)
    base = grids.dequantize(codes, scale, zero, grid)
    state = LinearState("x", base, torch.float32, quant=QuantizedWeight(grid, codes, scale, zero))
    unit = students.LoraUnit(state, base, teacher, rank=2, generator=torch.Generator())
    assert torch.equal(unit.weight().detach(), base)  # B = 0: the student exactly
    _, s, vh = torch.linalg.svd(teacher - base)
    assert torch.allclose(unit.params["lora_a"], s[:2].sqrt()[:, None] * vh[:2], atol=1e-5)
    # Moved: the merged weight is rounded onto the student's grid, as the checkpoint will hold it.
    unit.params["lora_b"] = torch.randn(8, 2)
    expected = grids.dequantize(grids.quantize(unit.merged(), scale, zero, grid), scale, zero, grid)
    assert torch.allclose(unit.weight(), expected)
    weight, quant = unit.final(torch.float32)
    assert quant.codes.max() <= grid.maxq and torch.equal(quant.scale, scale)
    assert torch.allclose(weight, expected)


def test_kd_loss_is_the_kl_divergence():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    expected = torch.nn.functional.kl_div(torch.log_softmax(s / 2, -1), torch.log_softmax(t / 2, -1),
                                          log_target=True, reduction="none").sum(-1).mean() * 4
    assert torch.allclose(distillation_loss(s, t, None, temperature=2.0), expected)
    assert distillation_loss(t, t, None) < 1e-6
    assert learning_rate_factor(0, 100, 0.1) == pytest.approx(0.1)
    assert learning_rate_factor(10, 100, 0.1) == pytest.approx(1.0)
    assert learning_rate_factor(99, 100, 0.1) < 0.01


def test_top_k_loss_is_the_kl_of_the_top_k_and_tail_bins():
    torch.manual_seed(0)
    s, t = torch.randn(6, 9), torch.randn(6, 9)
    for temperature in (1.0, 2.0):
        # k = the whole vocabulary: the plain KL divergence.
        values, ids = top_k_targets_of(t, 9, temperature)
        assert torch.allclose(top_k_distillation_loss(s, values, ids, temperature),
                              distillation_loss(s, t, None, temperature=temperature), atol=1e-6)
        # k = 3: the KL between (3 + 1)-bin distributions, written out by hand.
        values, ids = top_k_targets_of(t, 3, temperature)
        p, q = torch.softmax(t / temperature, -1), torch.softmax(s / temperature, -1)
        p_top, q_top = p.gather(-1, ids.long()), q.gather(-1, ids.long())
        p_bins = torch.cat([p_top, 1 - p_top.sum(-1, keepdim=True)], -1)
        q_bins = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
        expected = (p_bins * (p_bins / q_bins).log()).sum(-1).mean() * temperature**2
        assert torch.allclose(top_k_distillation_loss(s, values, ids, temperature), expected, atol=1e-6)
    assert float(top_k_distillation_loss(t, *top_k_targets_of(t, 3, 1.0))) < 1e-6


def top_k_targets_of(logits, k, temperature):
    top = torch.log_softmax(logits / temperature, -1).topk(k, dim=-1)
    return top.values, top.indices.to(torch.int32)


# -- whole runs on a tiny model ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def w3_student(llama_dir, calibration_file, tmp_path_factory):
    import compressor

    out = tmp_path_factory.mktemp("student") / "w3"
    compressor.quantize(str(llama_dir), output=out, bits=2, group_size=32, symmetric=False,
                        calibration=str(calibration_file), samples=4, seqlen=32)
    return out


def _student_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(ids).logits


def _kl_to_teacher(folder: Path, teacher: Path, ids: torch.Tensor) -> float:
    student, _ = load_model(resolve_source(str(folder)))
    dense, _ = load_model(resolve_source(str(teacher)))
    with torch.no_grad():
        return float(distillation_loss(student(ids).logits, dense(ids).logits, None))


@pytest.mark.parametrize("train", ["params", "scales", "lora"])
def test_distilled_student_keeps_its_grid_and_lowers_the_loss(w3_student, llama_dir, calibration_file,
                                                              tokenizer, tmp_path, train):
    out = tmp_path / f"kd-{train}"
    options = DistillOptions(train=train, steps=12, data=str(calibration_file), lr=3.0, **SMALL)
    result = distill(w3_student, llama_dir, out, options)
    run = result.manifest["distill"]
    assert len(run["curve"]) == 13 and run["tokens"] == 12 * 2 * 32 and run["tokens_per_second"] > 0
    # The KD loss on text of the training source falls.
    ids = data.calibration_windows(tokenizer, str(calibration_file), 4, 32, seed=5)
    # (LoRA only moves codes by flipping them through rounding: slower in 12 steps.)
    share = 0.99 if train == "lora" else 0.9
    assert _kl_to_teacher(out, llama_dir, ids) < share * _kl_to_teacher(w3_student, llama_dir, ids)
    # Every code on the student's grid, in the same packed layout and config.
    before = json.loads((w3_student / "config.json").read_text())["quantization_config"]
    after = json.loads((out / "config.json").read_text())["quantization_config"]
    assert after["config_groups"] == before["config_groups"]
    student = students.load_student(resolve_source(str(out)), False)
    original = students.load_student(resolve_source(str(w3_student)), False)
    for name, state in student.records.items():
        assert state.quant.grid == IntGrid(bits=2, group_size=32, symmetric=False)
        assert int(state.quant.codes.max()) <= 3
        if train == "scales":  # codes fixed: only the numbers beside them moved
            assert torch.equal(state.quant.codes, original.records[name].quant.codes)
    # transformers reads back the logits of the student written.
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(1))
    ours, _ = load_model(resolve_source(str(out)))
    with torch.no_grad():
        assert torch.allclose(_student_logits(out, ids), ours(ids).logits, atol=1e-4)


def test_kept_adapter_loads_in_peft_beside_the_unchanged_student(w3_student, llama_dir, calibration_file,
                                                                  tokenizer, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "kd-adapter"
    options = DistillOptions(train="lora", keep_adapter=True, rank=4, steps=12, data=str(calibration_file),
                             lr=3.0, **SMALL)
    distill(w3_student, llama_dir, out, options)
    # The student's checkpoint is unchanged, code for code and scale for scale.
    kept = students.load_student(resolve_source(str(out)), False).records
    original = students.load_student(resolve_source(str(w3_student)), False).records
    assert kept.keys() == original.keys()
    for name, state in kept.items():
        assert torch.equal(state.quant.codes, original[name].quant.codes)
        assert torch.equal(state.quant.scale, original[name].quant.scale)
    # PEFT reads the adapter onto the student transformers loads: its logits are the student's
    # weights plus B @ A, computed here by hand from the stored factors.
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(1))
    base = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, out / "adapter").eval()
    factors = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    by_hand, _ = load_model(resolve_source(str(out)))
    with torch.no_grad():
        for name in kept:
            a = factors[f"base_model.model.{name}.lora_A.weight"]
            b = factors[f"base_model.model.{name}.lora_B.weight"]
            assert a.shape[0] == 4 and b.abs().sum() > 0  # trained
            by_hand.get_submodule(name).weight.add_(b @ a)
        assert torch.allclose(peft_model(ids).logits, by_hand(ids).logits, atol=1e-4)
    # and the adapter brings the student closer to its teacher
    windows = data.calibration_windows(tokenizer, str(calibration_file), 4, 32, seed=5)
    dense, _ = load_model(resolve_source(str(llama_dir)))
    with torch.no_grad():
        teacher_logits = dense(windows).logits
        with_adapter = float(distillation_loss(peft_model(windows).logits, teacher_logits, None))
    assert with_adapter < 0.95 * _kl_to_teacher(w3_student, llama_dir, windows)


def test_resume_ends_with_the_bytes_of_an_uninterrupted_run(w3_student, llama_dir, calibration_file,
                                                            tmp_path):
    options = DistillOptions(steps=6, data=str(calibration_file), **SMALL)
    whole = distill(w3_student, llama_dir, tmp_path / "whole", options)

    def stop(step, total, figures):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(w3_student, llama_dir, tmp_path / "cut", options, on_step=stop)
    assert not (tmp_path / "cut").exists()
    resumed = distill(None, None, tmp_path / "cut", resume=True)
    assert resumed.manifest["checksum"]["sha256"] == whole.manifest["checksum"]["sha256"]
    assert resumed.manifest["distill"]["curve"] == whole.manifest["distill"]["curve"]


def test_cached_teacher_targets_give_the_bytes_of_the_first_run(w3_student, llama_dir, calibration_file,
                                                                tmp_path, isolated_cache, monkeypatch):
    """The first run computes the teacher's top-k per window and stores it; the second finds every
    window, runs no teacher forward, and writes the same checkpoint."""
    options = DistillOptions(steps=4, data=str(calibration_file), top_k=16, **SMALL)
    first = distill(w3_student, llama_dir, tmp_path / "first", options)
    stored = list((isolated_cache / "teacher-top-k").rglob("*.safetensors"))
    assert len(stored) == 4 * 2
    assert "0 windows found, 8 made" in first.manifest["distill"]["teacher_targets"]
    from compressor import teacher as teacher_module

    calls = []
    original = teacher_module.top_k_targets
    monkeypatch.setattr(teacher_module, "top_k_targets", lambda *args: calls.append(1) or original(*args))
    second = distill(w3_student, llama_dir, tmp_path / "second", options)
    assert calls == [] and "8 windows found, 0 made" in second.manifest["distill"]["teacher_targets"]
    assert second.manifest["checksum"]["sha256"] == first.manifest["checksum"]["sha256"]
    # and the top-k loss trains: the student moved from where it started
    assert first.manifest["checksum"]["sha256"] != distill(
        w3_student, llama_dir, tmp_path / "none", DistillOptions(steps=1, lr=1e-9, data=str(calibration_file),
                                                                  **SMALL)).manifest["checksum"]["sha256"]


def test_ternary_from_dense_writes_a_two_bit_checkpoint(llama_dir, calibration_file, tmp_path):
    out = tmp_path / "b158"
    result = distill(llama_dir, llama_dir, out, DistillOptions(number_format="ternary", steps=4, ramp=0.5,
                                                               data=str(calibration_file), **SMALL))
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    (group,) = qconfig["config_groups"].values()
    assert group["weights"]["num_bits"] == 2 and group["weights"]["symmetric"]
    assert group["weights"]["strategy"] == "channel"
    student = students.load_student(resolve_source(str(out)), False)
    for state in student.records.values():
        values = set(state.quant.codes.unique().tolist())
        assert values <= {1, 2, 3}  # -1, 0, +1
        scale = state.quant.scale.float()
        assert torch.allclose(scale, scale[0].expand_as(scale))  # one scale per tensor
    assert result.manifest["bpw"]["stored"] < 2.5


@pytest.mark.parametrize("schedule", ["pgf", "srste"])
def test_nm_sparse_training_ends_on_the_exact_pattern(llama_dir, calibration_file, tmp_path, schedule):
    out = tmp_path / f"s24-{schedule}"
    result = distill(llama_dir, llama_dir, out, DistillOptions(pattern="2:4", schedule=schedule, steps=6,
                                                               mask_every=2, data=str(calibration_file),
                                                               **SMALL))
    sparsity = json.loads((out / "config.json").read_text())["quantization_config"]["sparsity_config"]
    assert sparsity["sparsity_structure"] == "2:4" and sparsity["global_sparsity"] == pytest.approx(0.5)
    model, _ = load_model(resolve_source(str(out)))
    for name in result.manifest["modules"]:
        weight = model.get_submodule(name).weight
        assert mask_holds(weight != 0, Pattern(0.5, 2, 4)) or (weight == 0).float().mean() > 0.5


def test_pruned_student_trains_its_survivors_and_keeps_its_mask(llama_dir, calibration_file, tokenizer,
                                                                 tmp_path):
    """A sparse-only checkpoint (SparseGPT 2:4, weights dense on disk) is a student like a quantized one:
    transformers loads it through its compressed-tensors quantizer, which must not stay attached."""
    import compressor

    pruned = tmp_path / "s24"
    compressor.sparsify(str(llama_dir), output=pruned, pattern="2:4", method="sparsegpt",
                        calibration=str(calibration_file), samples=4, seqlen=32)
    out = tmp_path / "s24-kd"
    distill(pruned, llama_dir, out, DistillOptions(steps=8, data=str(calibration_file), lr=3.0, **SMALL))
    before, _ = load_model(resolve_source(str(pruned)))
    after, _ = load_model(resolve_source(str(out)))
    moved = 0
    for name in json.loads((pruned / "compress.json").read_text())["modules"]:
        old, new = before.get_submodule(name).weight, after.get_submodule(name).weight
        assert torch.equal(new == 0, old == 0)  # the mask exactly, no pruned weight revived
        moved += int((new != old).sum())
    assert moved > 0
    ids = data.calibration_windows(tokenizer, str(calibration_file), 4, 32, seed=5)
    assert _kl_to_teacher(out, llama_dir, ids) < _kl_to_teacher(pruned, llama_dir, ids)


def test_training_windows_never_overlap_the_evaluation_text(tokenizer):
    folder = data_dir()
    if folder is None:
        pytest.skip("no data folder")
    from transformers import AutoTokenizer

    from compressor.model import default_source

    real = AutoTokenizer.from_pretrained(default_source().path, gguf_file=default_source().gguf_file)
    test_ids = data.evaluation_ids(real, "wikitext2", folder)[0]
    test_text = set(map(tuple, test_ids[: len(test_ids) // 64 * 64].reshape(-1, 64).tolist()))
    for source in ("wikitext2", "c4"):
        train, held = data.training_windows(real, source, 32, 256, seed=0, data_dir=folder, heldout=4)
        grams = {tuple(w[i:i + 64].tolist()) for w in train for i in range(0, 193, 8)}
        assert not grams & test_text
        held_grams = {tuple(w[i:i + 64].tolist()) for w in held for i in range(0, 193)}
        assert not grams & held_grams


# -- refusals --------------------------------------------------------------------------------------------
def test_bad_inputs_exit_2_and_write_nothing(w3_student, llama_dir, calibration_file, tmp_path, tokenizer,
                                             capsys, monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM

    other = tmp_path / "other"  # another vocabulary
    config = AutoConfig.from_pretrained(llama_dir)
    config.vocab_size = 400
    AutoModelForCausalLM.from_config(config).save_pretrained(other)
    tokenizer.save_pretrained(other)
    cases = [
        ([w3_student, "--teacher", other], "vocabulary"),
        ([llama_dir, "--teacher", llama_dir], "not a checkpoint of this project"),
        ([w3_student, "--teacher", llama_dir, "--pattern", "2:4"], "pattern"),
        ([w3_student, "--teacher", llama_dir, "--data", tmp_path / "missing.txt"], "does not exist"),
        ([w3_student, "--teacher", llama_dir, "--train", "everything"], "--train"),
        ([w3_student, "--teacher", llama_dir, "--keep-adapter"], "needs --train lora"),
        ([w3_student, "--teacher", llama_dir, "--teacher-top-k", "100000"], "output rows"),
        ([w3_student, "--teacher", llama_dir, "--ramp", "0.5"], "--ramp"),
    ]
    for args, message in cases:
        out = tmp_path / "out"
        code, _, stderr = run_cli(["distill", *args, "--steps", "2", "--seqlen", "32", "-o", out],
                                  capsys, monkeypatch)
        assert code == 2, (args, stderr)
        assert message in stderr.replace("\n", " "), stderr
        assert not out.exists() and not (tmp_path / ".out.partial").exists()
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, _, stderr = run_cli(["distill", w3_student, "--teacher", llama_dir, "--data", empty, "-o",
                               tmp_path / "out"], capsys, monkeypatch)
    assert code == 2 and "no text" in stderr


def test_cli_distill_json(w3_student, llama_dir, calibration_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "kd"
    code, stdout, stderr = run_cli(["distill", w3_student, "--teacher", llama_dir, "--steps", "2", "--seqlen",
                                    "32", "--batch", "2", "--data", calibration_file, "-o", out, "--json"],
                                   capsys, monkeypatch)
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["distill"]["steps"] == 2 and summary["output"] == str(out)
    assert json.loads((out / "compress.json").read_text())["distill"]["teacher"]


def test_the_report_plots_the_training_curve(w3_student, llama_dir, calibration_file, tmp_path):
    from compressor.eval.runs import _training_curve, training_svg

    out = tmp_path / "kd"
    distill(w3_student, llama_dir, out, DistillOptions(steps=4, data=str(calibration_file), **SMALL))
    curve = _training_curve(out / "compress.json")
    assert [tokens for tokens, _ in curve] == [0, 128, 256]  # before, and every 2 steps of 2 x 32 tokens
    svg = training_svg([{"name": "kd", "training": curve}, {"name": "one-shot", "training": None}])
    assert svg.count("<polyline") == 1 and "kd" in svg
    assert training_svg([{"name": "one-shot", "training": None}]) is None
