"""`compress distill`: train a compressed student against its dense teacher, keeping its format.

    from compressor.distill import DistillOptions, distill
    distill("out/w3", "MODEL", "out/w3-kd", DistillOptions(train="params", minutes=30))

One loop for every kind of student (compressor.students makes the trainable units): the loss is
the KL divergence from the teacher's next-token distribution to the student's (temperature T,
scaled by T^2), plus `lm_weight` x the language-model loss; AdamW (no weight decay: latent weights
of a grid must stay near it), linear warm-up then cosine decay to 0. Each step reads `batch`
windows of `seqlen` tokens, drawn once with the seed from the training text (C4's slice,
WikiText-2 *validation*, a file, or text the teacher writes itself): never WikiText-2 test, and
never the held-out tail the run watches its perplexity on (compressor.data.training_windows).

A run is resumable: every `save_every` steps the trained tensors, the optimiser's state and the
curve are saved in the staging folder; `distill(..., resume=True)` continues from there and ends
with the same bytes as an uninterrupted run (the windows of step k are fixed by the seed, the
rest is deterministic on the CPU). The checkpoint is written by the same packer as every other
run, so it loads in transformers and in compressor.load like its student.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from compressor import students
from compressor.errors import CompressorError
from compressor.files import atomic_write
from compressor.model import ModelSource, block_linears, decoder_blocks, resolve_source
from compressor.passes import LinearState
from compressor.passes.reconstruct import _autocast  # bf16 where the device has native bf16
from compressor.sparsity import Pattern, pattern_from_args
from compressor.stream import keep_freed_memory
from compressor.teacher import TeacherCache, top_k_distillation_loss
from compressor.writer import MANIFEST, peak_rss_mb, staging_folder

TRAIN = ("params", "scales", "lora")
FORMATS = ("ternary",)
STATE = "distill-state.pt"
# Adam's step by what is trained. Range multipliers and zero offsets are O(1): on SmolLM2's W3 g64
# student (24 steps of 2 x 256 C4 tokens) 1e-3 took the held-out perplexity 31.6 -> 25.4, 3e-3 to
# 23.6, 1e-2 to 24.2. Codes move in steps of the grid ("units"; a code flips after half a step,
# so only a gradient that keeps its sign for much of a run flips one). Latent float weights
# (ternary, sparse) and norm gains relative to their mean size; LoRA factors absolute.
LEARNING_RATES = {"units": 1e-2, "range": 3e-3, "zero": 3e-3, "weight": 2e-3, "norm": 5e-4, "lora_a": 1e-3,
                  "lora_b": 1e-3}


@dataclass(frozen=True)
class DistillOptions:
    train: str = "params"  # params | scales | lora (ternary and N:M students: params)
    rank: int = 16  # lora
    keep_adapter: bool = False  # lora: write the adapters as a PEFT adapter beside the unchanged student
    number_format: str | None = None  # ternary: BitNet b1.58 from a dense student
    quantizer: str = "absmean"  # ternary scale: absmean | median of |W|
    per_channel: bool = False  # ternary: a scale per row instead of per tensor
    act_bits: int = 8  # ternary: activations absmax per token while training (0 = off)
    ramp: float = 0.0  # ternary: fraction of the steps over which the grid is phased in (0 = at once)
    pattern: str | None = None  # N:M sparse training
    schedule: str = "pgf"  # pgf | srste | fixed
    decay: str = "linear"  # pgf's factor on pruned weights: linear | exp
    mask_every: int = 10  # steps between re-chosen masks (pgf, srste)
    data: str = "c4"  # c4 | wikitext2 (validation) | self | a text / jsonl file
    seqlen: int = 512
    batch: int = 4
    steps: int | None = None  # or minutes, or tokens; default 200 steps
    minutes: float | None = None
    tokens: int | None = None
    lr: float | None = None  # scales every rate in LEARNING_RATES (1.0 = as listed)
    warmup: float = 0.05  # fraction of the steps
    temperature: float = 1.0
    lm_weight: float = 0.0
    top_k: int = 0  # 0: the live teacher's whole distribution; k: its top k, cached (compressor.teacher)
    norms: bool = True  # also train the norm gains (stored in float)
    eval_every: int = 50
    heldout: int = 8  # held-out windows watched during training
    save_every: int = 25
    checkpointing: bool = False  # gradient checkpointing (less memory, ~30% more time)
    bf16: bool | str = "auto"
    seed: int = 0

    def validate(self) -> None:
        def positive(name, value, kind=int):
            if value is not None and (not isinstance(value, kind) or isinstance(value, bool) or value <= 0):
                raise CompressorError(f"distill: {name} must be a positive number, got {value!r}")

        if self.train not in TRAIN:
            raise CompressorError(f"distill: --train must be one of {', '.join(TRAIN)}, got {self.train!r}")
        if self.number_format is not None and self.number_format not in FORMATS:
            raise CompressorError(f"distill: --format must be ternary, got {self.number_format!r}")
        if self.number_format and self.pattern:
            raise CompressorError("distill: give --format ternary or --pattern, not both")
        if (self.number_format or self.pattern) and self.train != "params":
            kind = "ternary" if self.number_format else "N:M"
            raise CompressorError(f"distill: a {kind} student trains its latent weights: --train params")
        if self.keep_adapter and self.train != "lora":
            raise CompressorError("distill: --keep-adapter keeps LoRA adapters: it needs --train lora")
        if self.quantizer not in students.QUANTIZERS:
            raise CompressorError(f"distill: --quantizer must be absmean or median, got {self.quantizer!r}")
        if self.schedule not in students.SCHEDULES:
            raise CompressorError(f"distill: --schedule must be one of {', '.join(students.SCHEDULES)}")
        if self.decay not in students.DECAYS:
            raise CompressorError(f"distill: --decay must be linear or exp, got {self.decay!r}")
        if self.act_bits not in (0, 4, 8):
            raise CompressorError(f"distill: --act-bits must be 0, 4 or 8, got {self.act_bits!r}")
        if sum(x is not None for x in (self.steps, self.minutes, self.tokens)) > 1:
            raise CompressorError("distill: give one of --steps, --minutes, --tokens")
        for name in ("rank", "mask_every", "seqlen", "batch", "steps", "tokens", "eval_every", "heldout",
                     "save_every"):
            positive(name, getattr(self, name))
        positive("minutes", self.minutes, (int, float))
        positive("lr", self.lr, (int, float))
        positive("temperature", self.temperature, (int, float))
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise CompressorError(
                f"distill: --teacher-top-k must be 0 or a positive integer, got {self.top_k!r}")
        if not 0 <= self.ramp < 1 or (self.ramp and not self.number_format):
            raise CompressorError("distill: --ramp is a fraction in [0, 1) of a --format ternary run")
        if not 0 <= self.warmup < 1 or self.lm_weight < 0:
            raise CompressorError("distill: --warmup must be in [0, 1) and --lm-weight >= 0")
        if self.pattern is not None:
            self.nm_pattern()

    def nm_pattern(self) -> Pattern:
        pattern = pattern_from_args({"pattern": self.pattern})
        if not pattern.is_nm:
            raise CompressorError(f"distill: --pattern must be N:M (e.g. 2:4), got {self.pattern!r}")
        return pattern


@dataclass
class DistillResult:
    output: str
    manifest: dict


# -- the student, trainable ------------------------------------------------------------------------
def _trainable(student: students.Student, teacher, options: DistillOptions
               ) -> dict[str, students.StudentLinear]:
    """Replace each compressed (or, for a dense student, each block) linear by a StudentLinear."""
    model, records = student.model, student.records
    if options.number_format or options.pattern:
        if not records:  # a dense student: every decoder-block linear gets the format
            prefix, blocks = decoder_blocks(model)
            for index, block in enumerate(blocks):
                for local, linear in block_linears(block).items():
                    name = f"{prefix}.{index}.{local}"
                    records[name] = LinearState(name=name, weight=linear.weight.detach().float().clone(),
                                                dtype=linear.weight.dtype)
        elif options.number_format:
            raise CompressorError("distill: --format ternary starts from the dense model; this student is "
                                  "compressed already")
        else:
            students.check_pattern(records, options.nm_pattern())
    generator = torch.Generator().manual_seed(options.seed)
    modules = {}
    for name, state in records.items():
        linear = model.get_submodule(name)
        if options.number_format:
            unit = students.TernaryUnit(state.weight, options.quantizer, options.per_channel, options.ramp)
        elif options.pattern:
            unit = students.SparseTrainUnit(state.weight, options.nm_pattern(), options.schedule, state.mask,
                                            options.decay)
        else:
            teacher_weight = teacher.get_submodule(name).weight if options.train == "lora" else None
            unit = students.make_unit(state, options.train, teacher_weight, options.rank, generator,
                                      options.keep_adapter)
        act_bits = options.act_bits if options.number_format else None
        modules[name] = students.StudentLinear(unit, linear.bias, act_bits)
        model.set_submodule(name, modules[name])
    return modules


def _norm_gains(model) -> dict[str, torch.nn.Parameter]:
    from compressor.passes.reconstruct import norm_gains

    _, blocks = decoder_blocks(model)
    gains = {}
    for index, block in enumerate(blocks):
        gains.update({f"{index}.{name}": gain for name, gain in norm_gains(block).items()})
    return gains


def _optimizer(modules: dict, norms: dict, options: DistillOptions) -> torch.optim.AdamW:
    scale = options.lr or 1.0
    groups = []
    for module in modules.values():
        for key, param in module.trained.items():
            size = float(param.detach().abs().mean()) if key == "weight" else 1.0
            groups.append({"params": [param], "lr": LEARNING_RATES[key] * scale * size})
    for gain in norms.values():
        size = float(gain.detach().abs().mean())
        groups.append({"params": [gain], "lr": LEARNING_RATES["norm"] * scale * size})
    for group in groups:
        group["base_lr"] = group["lr"]
    return torch.optim.AdamW(groups, weight_decay=0.0)


def learning_rate_factor(step: int, total: int, warmup: float) -> float:
    """Linear warm-up over `warmup` of the steps, then cosine decay to 0."""
    ramp = max(1, round(total * warmup)) if warmup > 0 else 0
    if step < ramp:
        return (step + 1) / ramp
    return 0.5 * (1 + math.cos(math.pi * (step - ramp) / max(1, total - ramp)))


# -- the loss ---------------------------------------------------------------------------------------
def distillation_loss(student_logits: torch.Tensor, teacher: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                      targets: torch.Tensor | None, temperature: float = 1.0, lm_weight: float = 0.0,
                      reduction: str = "mean") -> torch.Tensor:
    """T^2 x KL(teacher || student) per token at temperature T, plus lm_weight x the next-token
    loss against `targets` (the next token's id per position, -100 where there is none). `teacher`
    is the teacher's logits, or its top-k (log-probabilities, ids) from compressor.teacher."""
    t = temperature
    if isinstance(teacher, tuple):
        loss = top_k_distillation_loss(student_logits, *teacher, temperature=t, reduction=reduction)
    else:
        student_log = F.log_softmax(student_logits.float() / t, dim=-1)
        teacher_log = F.log_softmax(teacher.float() / t, dim=-1)
        per_token = (teacher_log.exp() * (teacher_log - student_log)).sum(-1) * t * t
        loss = per_token.sum() if reduction == "sum" else per_token.mean()
    if lm_weight:
        lm = F.cross_entropy(student_logits.flatten(0, -2).float(), targets.flatten(), ignore_index=-100,
                             reduction=reduction)
        loss = loss + lm_weight * lm
    return loss


# Tokens per chunk of the head and the loss: the logits are never whole ([batch, seqlen, vocab]
# in float32 is 400 MiB for SmolLM2 at 4 x 512, and its softmaxes several times that).
LOSS_CHUNK = 512


def distillation_step(model, teacher, ids: torch.Tensor, temperature: float = 1.0, lm_weight: float = 0.0,
                      autocast=None, cache: TeacherCache | None = None) -> float:
    """One forward and backward of the KD loss (gradients accumulate in the trained tensors' .grad);
    returns the loss. The decoders run whole; the shared-shape head and the loss run chunk by chunk
    on detached hidden states, and their gradient flows back into the student's decoder at once.
    With a `cache` the teacher's top-k targets come from it (the teacher runs only for windows it
    has not stored yet)."""
    import contextlib

    autocast = autocast or contextlib.nullcontext
    head, teacher_head = model.get_output_embeddings(), teacher.get_output_embeddings()
    if cache is None:
        with torch.no_grad(), autocast():
            teacher_hidden = teacher.base_model(ids, use_cache=False).last_hidden_state.flatten(0, 1)
    else:
        top_values, top_ids = cache.targets(teacher, ids, LOSS_CHUNK, autocast)
    with autocast():
        hidden = model.base_model(ids, use_cache=False).last_hidden_state
    flat = hidden.detach().flatten(0, 1)
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1).flatten()
    grad = torch.zeros_like(flat)
    total = 0.0
    for start in range(0, len(flat), LOSS_CHUNK):
        part = slice(start, start + LOSS_CHUNK)
        h = flat[part].clone().requires_grad_()
        if cache is None:
            with torch.no_grad(), autocast():
                wanted = teacher_head(teacher_hidden[part])
        else:
            wanted = (top_values[part], top_ids[part])
        with torch.enable_grad(), autocast():
            logits = head(h)
        loss = distillation_loss(logits, wanted, targets[part], temperature, lm_weight,
                                 reduction="sum") / len(flat)
        (grad[part],) = torch.autograd.grad(loss, h)
        total += loss.item()
    hidden.backward(grad.view_as(hidden))
    return total


@torch.no_grad()
def heldout_perplexity(model, windows: torch.Tensor, batch: int, device) -> float:
    total, count = 0.0, 0
    for start in range(0, len(windows), batch):
        ids = windows[start:start + batch].to(device)
        logits = model(ids, use_cache=False).logits[:, :-1].float()
        total += float(F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"))
        count += ids[:, 1:].numel()
    return math.exp(total / count)


# -- the run ------------------------------------------------------------------------------------------
def _check_teacher(student: students.Student, teacher, teacher_tokenizer, top_k: int = 0) -> None:
    mine, theirs = student.tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    rows = student.model.get_output_embeddings().weight.shape[0]
    teacher_rows = teacher.get_output_embeddings().weight.shape[0]
    if mine != theirs or rows != teacher_rows:
        raise CompressorError(f"the teacher's tokenizer or vocabulary differs from the student's "
                              f"({len(theirs)} vs {len(mine)} tokens, {teacher_rows} vs {rows} output rows)")
    if top_k > teacher_rows:
        raise CompressorError(f"distill: --teacher-top-k {top_k} is more than the teacher's {teacher_rows} "
                              "output rows")


def _windows(options: DistillOptions, total_steps: int, teacher_source: ModelSource, teacher, tokenizer,
             data_dir: Path | None):
    from compressor import data

    count = total_steps * options.batch
    if options.data == "self":
        from compressor.selfcal import self_windows

        made = self_windows(teacher_source, teacher, tokenizer, count + options.heldout, options.seqlen,
                            options.seed)
        return made[:count], made[count:]
    return data.training_windows(tokenizer, options.data, count, options.seqlen, options.seed, data_dir,
                                 options.heldout)


def _state_path(staging: Path) -> Path:
    return staging / STATE


def distill(student_path: str | Path | None, teacher_path: str | Path | None, output: str | Path,
            options: DistillOptions | None = None, *, device: str = "cpu", data_dir: str | Path | None = None,
            overwrite: bool = False, resume: bool = False, on_stage=None, on_step=None) -> DistillResult:
    """Distil `teacher_path` into the student at `student_path`; write the result to `output`.

    With resume=True the run saved in output's staging folder continues (its settings, student and
    teacher come from the saved state; `options` and the paths are ignored). `on_step(step, total,
    figures)` is called after every step (progress bars; a test may raise KeyboardInterrupt there).
    """
    from compressor.data import resolve_data_dir
    from compressor.model import load_model
    from compressor.pack import check_output

    keep_freed_memory()
    output = Path(output)
    staging = staging_folder(output)
    stage = on_stage or (lambda text: None)
    saved = None
    if resume:
        if not _state_path(staging).is_file():
            raise CompressorError(f"nothing to resume: no saved distillation state in {staging}")
        saved = torch.load(_state_path(staging), weights_only=False)
        options = DistillOptions(**saved["options"])
        student_path, teacher_path, device = saved["student"], saved["teacher"], saved["device"]
        data_dir = saved["data_dir"]
    else:
        options = options or DistillOptions()
        options.validate()
        check_output(output, overwrite)
    data_dir = resolve_data_dir(data_dir)
    torch_device = torch.device(device)
    student_source, teacher_source = resolve_source(student_path), resolve_source(teacher_path)
    stage(f"loading the student {student_source.label}")
    dense_target = bool(options.number_format or options.pattern)
    student = students.load_student(student_source, dense_target)
    if not student.records and not dense_target:
        raise CompressorError(f"{student_source.label} has no compressed layers to train")
    stage(f"loading the teacher {teacher_source.label}")
    teacher, teacher_tokenizer = load_model(teacher_source)
    _check_teacher(student, teacher, teacher_tokenizer, options.top_k)
    dtype = student.model.dtype
    student.model.float().to(torch_device)
    teacher.float().to(torch_device).eval()
    for param in [*student.model.parameters(), *teacher.parameters()]:
        param.requires_grad_(False)
    modules = _trainable(student, teacher, options)
    # A kept adapter leaves the student's checkpoint as it was: its norm gains too.
    norms = _norm_gains(student.model) if options.norms and not options.keep_adapter else {}
    for gain in norms.values():
        gain.requires_grad_(True)
    if options.checkpointing:
        student.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.model.train()
    optimizer = _optimizer(modules, norms, options)

    total = saved["total"] if saved else _total_steps(options, student.model, teacher, torch_device)
    stage(f"training text: {options.data}, {total} x {options.batch} windows of {options.seqlen}")
    train_windows, heldout = _windows(options, total, teacher_source, teacher, student.tokenizer, data_dir)
    progress = {"step": 0, "seconds": 0.0, "curve": [], "heldout_before": None}
    if saved:
        _restore(saved, modules, norms, optimizer)
        progress = saved["progress"]
    else:
        staging.mkdir(parents=True, exist_ok=True)
        student.model.eval()
        progress["heldout_before"] = heldout_perplexity(student.model, heldout, options.batch, torch_device)
        student.model.train()
        progress["curve"].append({"step": 0, "tokens": 0, "loss": None,
                                  "heldout_ppl": progress["heldout_before"]})
    run = dict(student=str(student_path) if student_path else None, teacher=str(teacher_path) if teacher_path
               else None, device=device, data_dir=str(data_dir) if data_dir else None)
    cache = None
    if options.top_k:
        from compressor.model import source_fingerprint

        cache = TeacherCache(source_fingerprint(teacher_source), options.top_k, options.temperature)
        stage(f"teacher: top {options.top_k} tokens per position, cached in {cache.folder}")
    _train(student.model, teacher, modules, norms, optimizer, options, total, train_windows, heldout,
           progress, staging, run, torch_device, stage, on_step, cache)
    return _write(student, modules, options, total, progress, output, staging, overwrite or resume, dtype,
                  teacher_source, student_source, cache)


def _total_steps(options: DistillOptions, model, teacher, device) -> int:
    tokens_per_step = options.batch * options.seqlen
    if options.steps:
        return options.steps
    if options.tokens:
        return max(1, math.ceil(options.tokens / tokens_per_step))
    if not options.minutes:
        return 200
    # A timing probe: two training steps' worth of forward and backward on random tokens, in the
    # precision the training runs in (bf16 autocast is ~2.5x faster here: a float32 probe left half
    # of --minutes unused), then as many steps as fit the budget (held-out evaluations counted in).
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(vocab, (options.batch, options.seqlen), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    times = []
    for _ in range(2):
        started = time.perf_counter()
        with torch.enable_grad():
            distillation_step(model, teacher, ids, autocast=lambda: _autocast(device, options.bf16))
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    per_step = min(times) * (1 + 0.5 * options.heldout / options.batch / options.eval_every)
    return max(2, int(options.minutes * 60 / per_step))


def _restore(saved: dict, modules: dict, norms: dict, optimizer) -> None:
    with torch.no_grad():
        for name, module in modules.items():
            for key, value in saved["trained"][name].items():
                module.trained[key].copy_(value)
            if name in saved["masks"]:
                module.unit.mask = saved["masks"][name]
                module.unit.factor = saved["factors"][name]
        for name, gain in norms.items():
            gain.copy_(saved["norms"][name])
    optimizer.load_state_dict(saved["optimizer"])


def _save_state(path: Path, modules: dict, norms: dict, optimizer, options, total, progress, run) -> None:
    sparse = {name: m.unit for name, m in modules.items() if isinstance(m.unit, students.SparseTrainUnit)}
    state = {
        "options": asdict(options), "total": total, "progress": progress, **run,
        "trained": {name: {key: value.detach().clone() for key, value in m.trained.items()}
                    for name, m in modules.items()},
        "masks": {name: unit.mask.clone() for name, unit in sparse.items()},
        "factors": {name: unit.factor for name, unit in sparse.items()},
        "norms": {name: gain.detach().clone() for name, gain in norms.items()},
        "optimizer": optimizer.state_dict(),
    }
    atomic_write(path, lambda partial: torch.save(state, partial))


def _train(model, teacher, modules, norms, optimizer, options, total, windows, heldout, progress, staging,
           run, device, stage, on_step, cache: TeacherCache | None = None) -> None:
    sparse = [m.unit for m in modules.values() if isinstance(m.unit, students.SparseTrainUnit)]
    ternary = [m.unit for m in modules.values() if isinstance(m.unit, students.TernaryUnit)]
    tokens_per_step = options.batch * options.seqlen
    stage("distilling")
    for step in range(progress["step"], total):
        started = time.perf_counter()
        if sparse and step % options.mask_every == 0:
            for unit in sparse:
                unit.update(step / total)
        for unit in ternary:  # the ramp's mix, a function of the step alone (so resume repeats it)
            unit.update(step / total)
        ids = windows[step * options.batch:(step + 1) * options.batch].to(device)
        with torch.enable_grad():
            loss = distillation_step(model, teacher, ids, options.temperature, options.lm_weight,
                                     lambda: _autocast(device, options.bf16), cache)
        if not math.isfinite(loss):
            raise CompressorError(f"distill: the loss became NaN/Inf at step {step}; try a lower --lr")
        factor = learning_rate_factor(step, total, options.warmup)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for module in modules.values():
                module.unit.clamp_()
        progress["seconds"] += time.perf_counter() - started
        progress["step"] = step + 1
        entry = {"step": step + 1, "tokens": (step + 1) * tokens_per_step, "loss": round(loss, 5)}
        if (step + 1) % options.eval_every == 0 or step + 1 == total:
            model.eval()
            entry["heldout_ppl"] = heldout_perplexity(model, heldout, options.batch, device)
            model.train()
        progress["curve"].append(entry)
        if (step + 1) % options.save_every == 0 and step + 1 < total:
            _save_state(_state_path(staging), modules, norms, optimizer, options, total, progress, run)
        if on_step is not None:
            on_step(step + 1, total, {"loss": entry["loss"], "tokens_per_second":
                                      (step + 1) * tokens_per_step / max(progress["seconds"], 1e-9)})


def _write(student, modules, options, total, progress, output, staging, overwrite, dtype, teacher_source,
           student_source, cache: TeacherCache | None = None) -> DistillResult:
    """Each unit's final weight and codes into the records, the plain linears back in the model, and
    the checkpoint written as every run writes one (staged, then renamed)."""
    from compressor.job import RECIPE_FILE, build_manifest
    from compressor.writer import folder_checksum, save_checkpoint

    model, records = student.model, student.records
    model_device = next(model.parameters()).device
    model.eval()
    for name, module in modules.items():
        weight, quant = module.unit.final(dtype)
        state = records[name]
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None, dtype=dtype)
        linear.weight.data.copy_(weight)
        if module.bias is not None:
            linear.bias.data.copy_(module.bias.detach())
        model.set_submodule(name, linear)
        state.weight, state.quant = weight.float(), quant
        if isinstance(module.unit, students.SparseTrainUnit):
            state.mask = module.unit.mask.cpu()
            pruned = int((~state.mask).sum())
            state.metrics.update(pattern=module.unit.pattern.label, sparsity=pruned / state.mask.numel(),
                                 pruned_weights=pruned)
        elif options.number_format:
            state.metrics.update(quantizer=options.quantizer, ternary=True)
        state.methods.append("distill")
    model.to("cpu").to(dtype)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    ignore = sorted(linears - set(records))
    for path in staging.iterdir():  # the saved state: not part of the checkpoint
        path.unlink() if path.is_file() else shutil.rmtree(path)
    weight_bytes = save_checkpoint(model, student.tokenizer, records, staging, ignore)
    if options.keep_adapter:
        _write_peft_adapter(modules, staging, output)
    source = ModelSource(**student.manifest["source"]) if student.manifest else student_source
    recipe = student.manifest["recipe"] if student.manifest else {"passes": []}
    manifest = build_manifest(model, source, recipe, records, None)
    if student.manifest:
        manifest["calibration"] = student.manifest.get("calibration")
    curve = progress["curve"]
    trained_tokens = total * options.batch * options.seqlen
    manifest["distill"] = {
        "student": student_source.label, "teacher": teacher_source.label, "options": asdict(options),
        "steps": total, "tokens": trained_tokens, "seconds": round(progress["seconds"], 1),
        "tokens_per_second": round(trained_tokens / max(progress["seconds"], 1e-9), 1),
        "heldout_ppl_before": progress["heldout_before"], "heldout_ppl_after": curve[-1].get("heldout_ppl"),
        "curve": curve, "precision": "bfloat16 autocast" if _bf16(options, model_device) else "float32",
        "teacher_targets": (f"top {options.top_k} cached ({cache.hits} windows found, {cache.misses} made "
                            "this session)" if cache else "live, whole distribution"),
    }
    if student.manifest and (Path(student_source.path) / RECIPE_FILE).is_file():
        shutil.copy(Path(student_source.path) / RECIPE_FILE, staging / RECIPE_FILE)
    manifest["size"] = {"weights_bytes": weight_bytes,
                        "folder_bytes": sum(f.stat().st_size for f in staging.rglob("*") if f.is_file())}
    manifest["seconds"] = {"distill": round(progress["seconds"], 3)}
    manifest["peak_rss_mb"] = round(peak_rss_mb(), 1)
    manifest["checksum"] = folder_checksum(staging)
    atomic_write(staging / MANIFEST, lambda path: path.write_text(json.dumps(manifest, indent=2) + "\n"))
    if output.exists():
        if not overwrite:
            raise CompressorError(f"output folder exists: {output} (pass --overwrite to replace it)")
        shutil.rmtree(output)
    staging.rename(output)
    return DistillResult(output=str(output), manifest=manifest)


# A subfolder: transformers loads a folder holding adapter_config.json as base + adapter, so the
# student's own folder stays a plain checkpoint that every loader reads as it was.
ADAPTER_DIR, ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter", "adapter_config.json", "adapter_model.safetensors"


def _write_peft_adapter(modules: dict, staging: Path, output: Path) -> None:
    """The LoRA factors as a PEFT adapter in OUTPUT/adapter (what `PeftModel.from_pretrained(model,
    OUTPUT/adapter)` reads): lora_A [r, in] and lora_B [out, r] per linear, alpha / r = 1 as they
    were trained."""
    from safetensors.torch import save_file

    tensors = {}
    for name, module in modules.items():
        for key, peft_key in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
            tensors[f"base_model.model.{name}.{peft_key}.weight"] = (
                module.trained[key].detach().float().contiguous().cpu())
    # Every linear has the same rank unless a matrix is smaller than --rank (then PEFT's rank_pattern).
    ranks = {name: module.trained["lora_a"].shape[0] for name, module in modules.items()}
    r = max(ranks.values())
    pattern = {name: rank for name, rank in ranks.items() if rank != r}
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": r,
        "alpha_pattern": pattern, "rank_pattern": pattern,
        "target_modules": sorted(modules), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        # The unchanged student is this folder's own checkpoint.
        "base_model_name_or_path": str(output.resolve()),
    }
    folder = staging / ADAPTER_DIR
    folder.mkdir()
    save_file(tensors, str(folder / ADAPTER_WEIGHTS))
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def _bf16(options: DistillOptions, device: torch.device) -> bool:
    from compressor.pipeline import native_bf16

    return bool(native_bf16(device)) if options.bf16 == "auto" else bool(options.bf16)
