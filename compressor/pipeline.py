"""The one sequential pipeline every pass plugs into.

    calibration ids -> inputs of decoder block 0 (with every keyword argument the block gets)
    for each block, on the compute device:
        find the sub-groups of linears that share an input ([q,k,v], [o], [gate,up], [down])
        run the block; at the first linear of each sub-group, accumulate the input statistics
        and compress the sub-group *before* it computes, so later sub-groups see compressed
        outputs ("true sequential") and the block's output is already the compressed one
        -> inputs of the next block ("propagate")

The statistics of a sub-group need every calibration chunk, so the chunks' forwards run in
lockstep as coroutines (greenlets): each pauses at a sub-group until all chunks have reached it and
it is compressed. Each chunk goes through each block exactly once, whatever the chunk size.

No model-specific code: sub-groups are discovered by which linears receive the same tensor.

Passes of the other scopes (compressor.passes.Scope) plug into the same loop: model passes run once
before block 0's inputs are captured; a block's block passes run after its sub-groups are
compressed, on the block's calibration inputs with the dense block's outputs as targets, and the
block's outputs are computed again afterwards. With a block pass whose targets come from the dense
model's own stream, that stream is carried beside the compressed one (twice the hidden states).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from greenlet import greenlet

from compressor import distributed
from compressor.errors import CompressorError
from compressor.model import block_linears, decoder_blocks
from compressor.passes import LinearState, Step, apply_steps, get_pass
from compressor.scaling import absorbs, fold_input_scale, input_producers
from compressor.stats import InputStats

Plan = dict[str, list[Step]]  # full module name -> the passes applied to it, in order
MODEL_KEY = ""  # the plan's key for model-scope steps (the model's own module name)

# Tokens per forward chunk by default: big enough for efficient matmuls, small enough that the
# temporaries stay under glibc's mmap threshold (32 MiB) and get reused rather than page-faulted.
CHUNK_TOKENS = 4096


class _StopForward(Exception):
    """Raised inside a hook to end a forward pass early (capturing block 0's inputs)."""


@dataclass
class BlockInputs:
    """Hidden states entering a block, in chunks, with the keyword arguments of each chunk's call.
    `dense` is the dense model's own stream, carried only for block passes that target it."""

    hidden: list[torch.Tensor]
    kwargs: list[dict]
    dense: list[torch.Tensor] | None = None


@dataclass
class BlockData:
    """What a block pass learns from: the block's calibration inputs (the compressed model's
    stream, what the block receives once deployed), each chunk's keyword arguments, the dense
    block's outputs as targets, and the block's linears' weights before any pass."""

    inputs: list[torch.Tensor]
    kwargs: list[dict]
    targets: list[torch.Tensor]
    dense_weights: dict[str, torch.Tensor]
    device: torch.device


# Passes that rescale a sub-group's input channels, folded into the input's producer.
INPUT_SCALING = ("awq",)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CompressorError("--device cuda was asked for but no CUDA device is available")
    try:
        return torch.device(device)
    except RuntimeError:
        raise CompressorError(f"unknown device {device!r}; use auto, cpu or cuda")


def native_bf16(device: torch.device) -> bool:
    """Whether bfloat16 matmuls run natively (CUDA, or a CPU with AMX / AVX512-BF16). Elsewhere
    oneDNN emulates them and they are several times *slower* than float32 (measured on AMD EPYC)."""
    return device.type == "cuda" or (device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def needs_data(plan: Plan) -> bool:
    return any(get_pass(s.method).needs_data(s.args) for steps in plan.values() for s in steps)


def statistics_needed(steps: list[Step]) -> set[str]:
    """Which input statistics ("hessian", "moments", "samples", "absmax") some linears' steps ask for."""
    needed: set[str] = set()
    for step in steps:
        module = get_pass(step.method)
        if module.needs_data(step.args):
            needed |= module.statistics(step.args) if hasattr(module, "statistics") else {"hessian"}
    return needed


class BlockHooks:
    """What happens around each block: nothing for a model already in memory. A streamed model
    loads the block before and writes and drops it after (compressor.job wires these)."""

    # Statistics gathered for every planned sub-group whatever its own steps need: for hooks that
    # also compress the sub-group in other ways (the search's level database).
    statistics_wanted: frozenset[str] = frozenset()

    def load(self, index: int, block) -> None:
        pass

    def statistics(self, index: int, block, names: list[str], stats: InputStats) -> None:
        """A sub-group's input statistics, complete, just before the plan compresses it."""

    def done(self, index: int, block, records: dict[str, LinearState], hidden: list | None) -> None:
        pass

    def transformed(self, method: str, figures: dict) -> None:
        """A model pass has run (figures for the manifest)."""


@torch.no_grad()
def compress_model(
    model,
    plan: Plan,
    calibration_ids: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
    batch_size: int | None = None,
    on_block: Callable[[int, int], None] | None = None,
    hooks: BlockHooks | None = None,
    first_block: int = 0,
    resume_hidden: list[torch.Tensor] | None = None,
    low_memory: bool = False,
) -> dict[str, LinearState]:
    """Apply `plan` to `model` in place, block by block; return what was done to each linear.

    `first_block` > 0 continues an interrupted run: the blocks before it are done, and
    `resume_hidden` holds what they passed on (the calibration hidden states entering it).
    `low_memory` recomputes each sub-group's inputs chunk by chunk instead of pausing every
    chunk mid-block: the same result, bit for bit, with one chunk's activations in memory instead
    of all of them, for about twice the block forwards.
    """
    device = torch.device(device)
    hooks = hooks or BlockHooks()
    prefix, blocks = decoder_blocks(model)
    for step in plan.get(MODEL_KEY, []):  # a resumed run repeats them: the model was loaded afresh
        hooks.transformed(step.method, get_pass(step.method).transform(model, step.args) or {})
    block_steps = {n: steps for n, steps in plan.items() if n != MODEL_KEY and _is_block(n, prefix)}
    if block_steps and distributed.world_size() > 1:
        raise CompressorError("block passes (reconstruct) run in one process; drop torchrun")
    carry_dense = any(get_pass(s.method).target_stream(s.args) == "dense"
                      for steps in block_steps.values() for s in steps)
    inputs = None
    if needs_data(plan) or hooks.statistics_wanted:  # also rejects unknown methods before any work
        if calibration_ids is None or calibration_ids.numel() == 0:
            raise CompressorError("this method needs calibration data, and none was given")
        inputs = capture_block_inputs(model, blocks, prefix, calibration_ids, device, batch_size)
        if carry_dense:
            inputs.dense = list(inputs.hidden)
        if first_block > 0:
            # With a dense stream the saved states are the compressed stream, then the dense one.
            saved = len(inputs.hidden) * (2 if carry_dense else 1)
            if resume_hidden is None or len(resume_hidden) != saved:
                raise CompressorError("the saved calibration activations do not match this run")
            inputs.hidden = resume_hidden[:len(inputs.hidden)]
            if carry_dense:
                inputs.dense = resume_hidden[len(inputs.hidden):]
    records: dict[str, LinearState] = {}
    for index in range(first_block, len(blocks)):
        block = blocks[index]
        block_prefix = f"{prefix}.{index}."
        block_plan = {n[len(block_prefix):]: s for n, s in plan.items() if n.startswith(block_prefix)}
        hooks.load(index, block)
        block.to(device)
        if inputs is None:
            done = _compress_block_without_data(block, block_plan)
        else:
            compress_block = _compress_block_recomputing if low_memory else _compress_block
            observer = Observer(lambda names, stats, i=index, b=block: hooks.statistics(i, b, names, stats),
                                hooks.statistics_wanted)
            steps = block_steps.get(f"{prefix}.{index}", [])
            if steps:
                done = _compress_and_refine_block(block, block_plan, steps, inputs, device, observer,
                                                  compress_block)
            else:
                if inputs.dense is not None:  # a block without block passes: the dense stream moves on
                    inputs.dense = _block_outputs(block, inputs.dense, inputs.kwargs, device)
                done, inputs.hidden = compress_block(block, block_plan, inputs, device, observer)
        block.to("cpu")
        done = {block_prefix + name: state for name, state in done.items()}
        hidden = None if inputs is None else inputs.hidden + (inputs.dense or [])
        hooks.done(index, block, done, hidden)
        records.update(done)
        if on_block:
            on_block(index + 1, len(blocks))
    return records


def _is_block(name: str, prefix: str) -> bool:
    return name.startswith(prefix + ".") and name[len(prefix) + 1:].isdigit()


def _block_outputs(block, hidden: list[torch.Tensor], kwargs: list[dict], device) -> list[torch.Tensor]:
    """The block's output for each chunk, as it is now."""
    return [output_hidden(block(h.to(device), **to_device(k, device)))
            for h, k in zip(hidden, kwargs, strict=True)]


def _compress_and_refine_block(block, block_plan: Plan, steps: list[Step], inputs: BlockInputs, device,
                               observer, compress_block) -> dict[str, LinearState]:
    """Targets from the dense block, then the sub-groups compressed as usual, then the block passes
    (on the block's inputs against those targets), then the block's outputs from its final weights."""
    from_dense = [get_pass(s.method).target_stream(s.args) == "dense" for s in steps]
    if any(from_dense) and not all(from_dense):
        raise CompressorError("the block passes of one block must agree on their targets")
    if inputs.dense is not None:  # the dense stream moves on through the dense block
        inputs.dense = _block_outputs(block, inputs.dense, inputs.kwargs, device)
    targets = inputs.dense if all(from_dense) else _block_outputs(block, inputs.hidden, inputs.kwargs, device)
    block_inputs = list(inputs.hidden)  # the recomputing pipeline overwrites its list with outputs
    dense_weights = {name: linear.weight.data.clone() for name, linear in block_linears(block).items()}
    done, _ = compress_block(block, block_plan, BlockInputs(list(inputs.hidden), inputs.kwargs), device,
                             observer, keep_unrounded=True)
    data = BlockData(inputs=block_inputs, kwargs=inputs.kwargs, targets=targets, dense_weights=dense_weights,
                     device=device)
    for step in steps:
        get_pass(step.method).refine(block, done, data, step.args)
    inputs.hidden = _block_outputs(block, block_inputs, inputs.kwargs, device)
    return done


def capture_block_inputs(model, blocks, prefix, ids, device, batch_size) -> BlockInputs:
    """Run the model up to block 0 and keep what block 0 receives (hidden states and kwargs)."""
    captured = BlockInputs(hidden=[], kwargs=[])

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: (False if k == "use_cache" else v) for k, v in kwargs.items()}
        # A cache object would grow across calls; the pipeline never needs one.
        kwargs = {k: v for k, v in kwargs.items() if "cache" not in type(v).__name__.lower()}
        captured.hidden.append(hidden)
        captured.kwargs.append(kwargs)
        raise _StopForward

    batch_size = batch_size or max(1, CHUNK_TOKENS // ids.shape[1])
    _move_outside(model, prefix, device)
    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for chunk in ids.split(batch_size):
            try:
                model(input_ids=chunk.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
        _move_outside(model, prefix, "cpu")
    return captured


def _move_outside(model, prefix: str, device) -> None:
    """Move every parameter and buffer that is not inside the decoder blocks (embeddings, norms)."""
    for name, module in model.named_modules():
        if name == prefix or name.startswith(prefix + "."):
            continue
        for _, param in module.named_parameters(recurse=False):
            param.data = param.data.to(device)
        for key, buffer in module.named_buffers(recurse=False):
            module._buffers[key] = buffer.to(device)


def to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def batch_rows(obj, batch: int, start: int, stop: int):
    """Rows start:stop of a chunk's tensors whose leading dimension is the chunk's batch (the
    hidden states and per-sample kwargs; shared ones such as [1, seq] positions stay whole)."""
    if isinstance(obj, torch.Tensor):
        return obj[start:stop] if obj.dim() > 0 and obj.shape[0] == batch and batch > 1 else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(batch_rows(o, batch, start, stop) for o in obj)
    if isinstance(obj, dict):
        return {k: batch_rows(v, batch, start, stop) for k, v in obj.items()}
    return obj


def output_hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def first_row(hidden: torch.Tensor, kwargs: dict, device) -> tuple[torch.Tensor, dict]:
    """One calibration window of a chunk (its hidden state and keyword inputs), on `device`: what
    the one-sample tracing forwards run on."""
    batch = hidden.shape[0]
    return batch_rows(hidden, batch, 0, 1).to(device), to_device(batch_rows(kwargs, batch, 0, 1), device)


def linear_groups(block, hidden: torch.Tensor, kwargs: dict, device) -> list[list[str]]:
    """Linears of `block` grouped by shared input, in call order, from a one-sample forward."""
    linears = block_linears(block)
    seen: list[tuple[torch.Tensor, list[str]]] = []
    handles = []

    def record(name):
        def hook(module, args):
            x = args[0]
            for tensor, names in seen:
                if tensor is x:
                    if name not in names:
                        names.append(name)
                    return
            if not any(name in names for _, names in seen):
                seen.append((x, [name]))

        return hook

    for name, linear in linears.items():
        handles.append(linear.register_forward_pre_hook(record(name)))
    try:
        one_hidden, one_kwargs = first_row(hidden, kwargs, device)
        block(one_hidden, **one_kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return [names for _, names in seen]


def _compress_linears(linears: dict, names: list[str], block_plan: Plan, stats,
                      keep_unrounded: bool = False) -> dict[str, LinearState]:
    """Apply each linear's steps; linears with identical steps go together where a pass can batch.
    `keep_unrounded`: a block pass follows, which learns the rounding (LinearState.unrounded)."""
    states = {
        name: LinearState(name=name, weight=linears[name].weight.data.to(torch.float32, copy=True),
                          dtype=linears[name].weight.dtype, original=linears[name].weight.data,
                          keep_unrounded=keep_unrounded)
        for name in names
    }
    # Leading input-scaling steps (AWQ) that every linear of the input shares run on all of them at
    # once, before their own steps part ways (a GGUF preset gives attn_v another type than q and k).
    shared = _shared_scaling_steps([block_plan[n] for n in names])
    if shared:
        apply_steps(list(states.values()), block_plan[names[0]][:shared], stats)
    buckets: dict[str, list[str]] = {}
    for name in names:
        buckets.setdefault(repr(block_plan[name][shared:]), []).append(name)
    if len(buckets) > 1 and any(s.method in INPUT_SCALING for n in names for s in block_plan[n][shared:]):
        raise CompressorError(f"{' and '.join(INPUT_SCALING)} rescale a shared input: linears that read "
                              f"one input ({', '.join(names)}) need the same steps")
    for bucket in buckets.values():
        apply_steps([states[n] for n in bucket], block_plan[bucket[0]][shared:], stats)
    for name, state in states.items():
        _store(linears[name], state)
        # Ranks of a distributed run propagate rank 0's weights, bit for bit.
        distributed.broadcast_(linears[name].weight.data)
    return states


def _shared_scaling_steps(plans: list) -> int:
    """How many leading steps are input-scaling steps that all of `plans` hold, identically."""
    shared = 0
    for steps in zip(*plans, strict=False):  # up to the shortest plan
        if steps[0].method not in INPUT_SCALING or len({repr(step) for step in steps}) > 1:
            break
        shared += 1
    return shared


def _store(linear: torch.nn.Linear, state: LinearState) -> None:
    """Write the result into the model; the record keeps only what the writer packs (on the CPU)."""
    if not torch.isfinite(state.weight).all():
        raise CompressorError(f"{state.name}: compression produced NaN/Inf weights")
    linear.weight.data.copy_(state.weight.to(linear.weight.dtype))
    state.weight = state.original = None
    if state.unrounded is not None:
        state.unrounded = state.unrounded.cpu()
    if state.quant is not None:
        for item in fields(state.quant):
            value = getattr(state.quant, item.name)
            if isinstance(value, torch.Tensor):
                setattr(state.quant, item.name, value.cpu())
    if state.mask is not None:
        state.mask = state.mask.cpu()


def _compress_block_without_data(block, block_plan: Plan) -> dict[str, LinearState]:
    linears = block_linears(block)
    return _compress_linears(linears, [n for n in block_plan if n in linears], block_plan, None)


def _planned_groups(block, block_plan: Plan, inputs: BlockInputs, device) -> list[list[str]]:
    """The block's sub-groups in call order, keeping the linears the plan compresses."""
    return [
        planned
        for names in linear_groups(block, inputs.hidden[0], inputs.kwargs[0], device)
        if (planned := [n for n in names if n in block_plan])
    ]


def _compress_group(block, linears: dict, names: list[str], block_plan: Plan, stats: InputStats,
                    records: dict[str, LinearState], producers: dict, keep_unrounded: bool):
    """Compress one sub-group into `records`; if a pass rescaled its input (AWQ), fold 1/scale into
    the input's producer and return the scale (inputs already computed must be divided by it)."""
    stats.foldable = absorbs(producers.get(names[0]), records)
    records.update(_compress_linears(linears, names, block_plan, stats, keep_unrounded))
    if stats.input_scale is None:
        return None
    fold_input_scale(block, producers[names[0]], stats.input_scale, records)
    return stats.input_scale


def _input_producers(block, block_plan: Plan, groups: list[list[str]], inputs: BlockInputs, device):
    """Where each sub-group's input scale would fold, when a pass may rescale inputs (AWQ)."""
    if not any(s.method in INPUT_SCALING for steps in block_plan.values() for s in steps):
        return {}
    return input_producers(block, *first_row(inputs.hidden[0], inputs.kwargs[0], device), groups)


@dataclass(frozen=True)
class Observer:
    """Who sees each sub-group's statistics before it is compressed, and what they need gathered."""

    see: Callable[[list[str], InputStats], None] = lambda names, stats: None
    wanted: frozenset[str] = frozenset()


def _new_stats(linear, steps: list[Step], device, wanted: frozenset[str] = frozenset()) -> InputStats:
    needed = statistics_needed(steps) | wanted
    return InputStats(linear.in_features, hessian="hessian" in needed, moments="moments" in needed,
                      samples="samples" in needed, absmax="absmax" in needed, device=device)


def _compress_block_recomputing(block, block_plan: Plan, inputs: BlockInputs, device,
                                observer: Observer = Observer(), keep_unrounded: bool = False):
    """Sub-group by sub-group: run each chunk from the block's input up to the sub-group's first
    linear (stopping there), gather the statistics, compress; then one full pass for the outputs,
    each replacing its input as it is made. Bit-identical to _compress_block's lockstep."""
    linears = block_linears(block)
    records: dict[str, LinearState] = {}
    groups = _planned_groups(block, block_plan, inputs, device)
    producers = _input_producers(block, block_plan, groups, inputs, device)
    for names in groups:
        stats = _new_stats(linears[names[0]], [s for name in names for s in block_plan[name]], device,
                           observer.wanted)

        def gather(module, args, stats=stats):
            stats.add_batch(args[0])
            raise _StopForward

        handle = linears[names[0]].register_forward_pre_hook(gather)
        try:
            for hidden, kwargs in zip(inputs.hidden, inputs.kwargs, strict=True):
                try:
                    block(hidden.to(device), **to_device(kwargs, device))
                except _StopForward:
                    pass
        finally:
            handle.remove()
        stats.all_reduce()  # a distributed run: the statistics of every rank's windows
        observer.see(names, stats)
        _compress_group(block, linears, names, block_plan, stats, records, producers, keep_unrounded)
        del stats
    outputs = inputs.hidden
    for chunk, kwargs in enumerate(inputs.kwargs):
        outputs[chunk] = output_hidden(block(outputs[chunk].to(device), **to_device(kwargs, device)))
    return records, outputs


def _compress_block(block, block_plan: Plan, inputs: BlockInputs, device, observer: Observer = Observer(),
                    keep_unrounded: bool = False):
    """Run every chunk through the block in lockstep, compressing each sub-group just in time.

    Each chunk's forward runs as a greenlet (a coroutine on this thread). The hook on a sub-group's
    first linear adds the chunk's input to the statistics and hands control back; once every chunk
    has arrived, the sub-group is compressed and the chunks resume, now through compressed weights.
    So each chunk runs through the block exactly once, and only small per-chunk tensors are alive.
    """
    linears = block_linears(block)
    groups = _planned_groups(block, block_plan, inputs, device)
    producers = _input_producers(block, block_plan, groups, inputs, device)
    folded: dict[int, torch.Tensor] = {}  # sub-group -> the scale its waiting inputs are divided by
    driver = greenlet.getcurrent()
    stats: dict[int, InputStats] = {}
    steps = [[s for name in names for s in block_plan[name]] for names in groups]

    def at_group(index: int):
        def hook(module, args):
            if index not in stats:
                stats[index] = _new_stats(linears[groups[index][0]], steps[index], device, observer.wanted)
            stats[index].add_batch(args[0])
            driver.switch(index)  # wait here until the sub-group is compressed
            if index in folded:  # its producer now divides by the scale: so must this input
                args[0].div_(folded[index].to(args[0]))

        return hook

    def forward(chunk: int):
        hidden = inputs.hidden[chunk].to(device)
        return output_hidden(block(hidden, **to_device(inputs.kwargs[chunk], device)))

    # The hook sits on the group's first-called linear (linear_groups keeps call order).
    handles = [
        linears[names[0]].register_forward_pre_hook(at_group(index))
        for index, names in enumerate(groups)
    ]
    records: dict[str, LinearState] = {}
    outputs: list[torch.Tensor | None] = [None] * len(inputs.hidden)
    workers = [greenlet(lambda c=c: forward(c)) for c in range(len(outputs))]
    waiting: dict[int, int] = {}  # chunk -> the sub-group it waits at

    def resume(chunk: int) -> None:
        result = workers[chunk].switch()
        if workers[chunk].dead:
            outputs[chunk] = result
        else:
            waiting[chunk] = result

    try:
        for chunk in range(len(workers)):
            resume(chunk)
        while waiting:
            # Sub-groups are reached in call order; a chunk that skipped one (a router sending it
            # nowhere) simply waits further on, so the earliest waited-at sub-group is complete.
            index = min(waiting.values())
            stat = stats.pop(index)
            stat.all_reduce()  # a distributed run: the statistics of every rank's windows
            observer.see(groups[index], stat)
            scale = _compress_group(block, linears, groups[index], block_plan, stat, records, producers,
                                    keep_unrounded)
            if scale is not None:
                folded[index] = scale
            for chunk in [c for c, at in waiting.items() if at == index]:
                del waiting[chunk]
                resume(chunk)
    finally:
        for handle in handles:
            handle.remove()
    return records, outputs
