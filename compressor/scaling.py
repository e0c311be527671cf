"""Where a sub-group's input comes from, and folding a per-channel input scale into it.

A pass that rescales a sub-group's input channels (AWQ: the weights' columns times s, the input
divided by s) needs the division done by whatever produces that input, so that the checkpoint
stays a plain model. Two producers fold exactly:

    an RMSNorm         out = gain * x / rms(x):   gain <- gain / s
    a linear's output  multiplied elementwise by something else before it is read (SwiGLU's
                       act(gate(x)) * up(x) feeding down_proj):   up's rows <- rows / s
                       (a quantized up_proj keeps its codes: its per-row scales are divided)

They are found by one traced forward of a single window through the block (the approach of
compressor.rotate): what each linear reads, followed through view-like operations. Any other
use of the produced tensor (a norm's output feeding a non-linear, a linear's output also used
elsewhere) means the fold would change more than the sub-group, so there is no producer and the
sub-group is left unscaled. Attention outputs (o_proj's input) have none: v_proj's rows would
fold only when heads map one to one, and grouped-query attention shares them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode

from compressor import grids
from compressor.model import block_linears
from compressor.passes import LinearState, QuantizedWeight
from compressor.rotate import VIEW_OPS

_MULTIPLY = {"mul", "__mul__", "__rmul__"}


@dataclass(frozen=True)
class Producer:
    kind: str  # "norm" or "linear"
    name: str  # module name within the block


class _Trace(TorchFunctionMode):
    def __init__(self, weights: dict[int, str]):
        super().__init__()
        self.weights = weights  # id(linear weight) -> name
        self.tracked: dict[int, Producer] = {}
        self.keep: list[torch.Tensor] = []  # tracked tensors stay alive so ids are not reused
        self.read_by: dict[Producer, set[str]] = {}
        self.uses: dict[Producer, int] = {}  # uses other than being read by linears
        self.products: dict[Producer, int] = {}  # elementwise products a linear's output entered

    def track(self, tensor, producer: Producer) -> None:
        self.tracked[id(tensor)] = producer
        self.keep.append(tensor)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", str(func))
        inputs = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        sources = [self.tracked[id(a)] for a in inputs if id(a) in self.tracked]
        if name == "linear" and isinstance(out, torch.Tensor):
            linear = self.weights.get(id(args[1]))
            if id(args[0]) in self.tracked:
                source = self.tracked[id(args[0])]
                if linear is None:
                    self.uses[source] = self.uses.get(source, 0) + 1
                else:
                    self.read_by.setdefault(source, set()).add(linear)
            if linear is not None:
                self.track(out, Producer("linear", linear))
            return out
        if not sources or not isinstance(out, torch.Tensor):
            return out
        for source in sources:
            same_width = out.shape[-1:] == inputs[0].shape[-1:]
            if name in VIEW_OPS and same_width:
                self.track(out, source)
            elif (name in _MULTIPLY and source.kind == "linear" and len(inputs) == 2
                  and inputs[0].shape == inputs[1].shape and len(sources) == 1):
                # act(gate) * up: scaling up's rows scales the product's channels alike.
                self.products[source] = self.products.get(source, 0) + 1
                self.track(out, source)
            else:
                self.uses[source] = self.uses.get(source, 0) + 1
        return out


def _is_gain_norm(module) -> bool:
    """An RMSNorm-like module whose output is linear in its 1-D gain, channel by channel."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or getattr(module, "bias", None) is not None:
        return False
    if "norm" not in type(module).__name__.lower():
        return False
    x = torch.randn(3, weight.numel(), generator=torch.Generator().manual_seed(0)).to(weight)
    factor = torch.rand(weight.numel(), generator=torch.Generator().manual_seed(1)).to(weight) + 0.5
    original = weight.data.clone()
    try:
        with torch.no_grad():
            base = module(x).float()
            weight.data.mul_(factor)
            scaled = module(x).float()
    finally:
        weight.data.copy_(original)
    expected = base * factor.float()
    return bool((scaled - expected).abs().max() <= 1e-2 * expected.abs().max().clamp(min=1e-6))


@torch.no_grad()
def input_producers(block, hidden: torch.Tensor, kwargs: dict, groups: list[list[str]]
                    ) -> dict[str, Producer]:
    """first linear of a sub-group -> the producer its input's scale folds into (where one exists).
    `hidden`/`kwargs`: one window's block input, on the block's device."""
    from compressor.pipeline import output_hidden

    linears = block_linears(block)
    norms = {name: module for name, module in block.named_modules() if _is_gain_norm(module)}
    trace = _Trace({id(m.weight): n for n, m in linears.items()})
    handles = [module.register_forward_hook(lambda mod, args, out, n=n: trace.track(out, Producer("norm", n)))
               for n, module in norms.items()]
    try:
        with trace:
            output_hidden(block(hidden, **kwargs))
    finally:
        for handle in handles:
            handle.remove()
    found = {}
    for group in groups:
        for producer, readers in trace.read_by.items():
            if set(group) <= readers and readers <= set(group) and not trace.uses.get(producer):
                if producer.kind == "norm" or trace.products.get(producer) == 1:
                    found[group[0]] = producer
    return found


def absorbs(producer: Producer | None, records: dict[str, LinearState]) -> bool:
    """Whether the producer can take an input scale: a norm, or a linear that is dense, sparse or on
    an integer grid (a 4-bit float grid's shared scales cannot absorb a per-row factor)."""
    if producer is None:
        return False
    state = records.get(producer.name)
    return producer.kind == "norm" or state is None or state.quant is None or isinstance(
        state.quant, QuantizedWeight)


@torch.no_grad()
def fold_input_scale(block, producer: Producer, scale: torch.Tensor, records: dict[str, LinearState]) -> None:
    """Divide the producer's output channels by `scale` (records: the block's, by block-relative name)."""
    module = block.get_submodule(producer.name)
    inverse = (1.0 / scale.double()).to(module.weight.device)
    if producer.kind == "norm":
        module.weight.data = (module.weight.double() * inverse).to(module.weight.dtype)
        return
    module.weight.data = (module.weight.double() * inverse[:, None]).to(module.weight.dtype)
    if getattr(module, "bias", None) is not None:
        module.bias.data = (module.bias.double() * inverse).to(module.bias.dtype)
    state = records.get(producer.name)
    if state is not None and state.quant is not None:
        quant = state.quant
        stored = quant.scale.dtype
        quant.scale = (quant.scale.double() * inverse.cpu()[:, None]).to(stored)
        # The weight the model computes with is the one the checkpoint will hold.
        module.weight.data = grids.dequantize(quant.codes, quant.scale.float(), quant.zero, quant.grid,
                                              module.weight.dtype).to(module.weight.device)
