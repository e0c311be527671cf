"""Rotating the residual stream into the weights (QuaRot / SpinQuant R1 and R2, no runtime op).

A decoder's residual stream x only meets the weights through linears, RMSNorms and the embedding.
For an orthogonal Q, rms(x Q) = rms(x), so once every RMSNorm gain is folded into the linears that
read the norm's output (the gain set to 1), the whole model computes the same function on x Q:

    embedding        E <- E Q
    readers          W <- W Q          (q, k, v, gate, up, lm_head: they read the stream)
    writers          W <- Q^T W, b <- Q^T b   (o, down: their outputs are added into it)

R2 rotates each attention head's values: v only enters attention linearly, so v_proj's rows of
each head can be multiplied by an orthogonal H (the same for every head, so grouped-query
attention is fine) and o_proj's matching columns by H^T.

The point is quantization: a Hadamard-like Q spreads a few outlier channels over all of them, so
the weights (and the Hessians GPTQ collects afterwards) are flatter. The rotated checkpoint is a
plain model of the same architecture; only the embedding may need untying (folding the final norm
into lm_head makes it differ from the embedding).

Nothing here names a model family except R2, which finds the value and output projections of the
attention by their standard names (v_proj, o_proj). The rest is found by one short forward pass
traced with a TorchFunctionMode: which linears read each RMSNorm's output (and that nothing else
does), and which linears' outputs are added straight into the stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode

from compressor.errors import CompressorError
from compressor.model import block_linears, decoder_blocks

# Primes for Paley's constructions of a Hadamard factor K in n = K * 2^m (Paley I: K = q + 1 for a
# prime q = 3 mod 4, Paley II: K = 2(q + 1) for a prime q = 1 mod 4): up to K = 512, far beyond the
# 12 and 36 that SmolLM2 (hidden 576 = 36 * 16, MLP 1536 = 12 * 128) and most models need.
_PRIMES = [p for p in range(3, 256) if all(p % d for d in range(2, int(p**0.5) + 1))]


# -- orthogonal matrices --------------------------------------------------------------------------

def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(j - i) with chi the quadratic character mod the prime q (chi(0) = 0)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)], dtype=torch.float64)
    index = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[index]


def _paley1(q: int) -> torch.Tensor:
    """Order q + 1, q = 3 mod 4: H = I + [[0, 1^T], [-1, Q]] (Q is antisymmetric)."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return s + torch.eye(q + 1, dtype=torch.float64)


def _paley2(q: int) -> torch.Tensor:
    """Order 2(q + 1), q = 1 mod 4, from the symmetric conference matrix S = [[0, 1^T], [1, Q]]:
    H = S x [[1, 1], [1, -1]] + I x [[1, -1], [-1, -1]]."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = 1
    s[1:, 1:] = _jacobsthal(q)
    a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(s, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


def _paley_factor(k: int):
    """A Hadamard matrix of order k from Paley's constructions, or None."""
    if k - 1 in _PRIMES and (k - 1) % 4 == 3:
        return _paley1(k - 1)
    if k % 2 == 0 and k // 2 - 1 in _PRIMES and (k // 2 - 1) % 4 == 1:
        return _paley2(k // 2 - 1)
    return None


def _hadamard(n: int) -> tuple[torch.Tensor, str] | None:
    """(unnormalised Hadamard matrix of order n, its label), or None when we cannot build one:
    Sylvester for a power of two, else Paley(K) x Sylvester(2^m) with the smallest such K."""
    if n >= 1 and n & (n - 1) == 0:
        return _sylvester(n), f"hadamard-{n}"
    power = n & -n  # the largest power of two dividing n
    while power >= 1:
        k = n // power
        factor = _paley_factor(k)
        if factor is not None:
            label = f"hadamard-{k}x{power}" if power > 1 else f"hadamard-{k}"
            return torch.kron(factor, _sylvester(power)), label
        power //= 2
    return None


def rotation_label(n: int) -> str:
    """What orthogonal_matrix(n) builds: "hadamard-36x16", "hadamard-64" or "random-orthogonal"."""
    found = _hadamard(n)
    return found[1] if found else "random-orthogonal"


def orthogonal_matrix(n: int, seed: int = 0) -> torch.Tensor:
    """An n x n orthogonal matrix in float64: a normalised Hadamard matrix times a random +-1
    diagonal where one can be built (entries +-1/sqrt(n): an outlier is spread evenly), else a
    random orthogonal matrix from the QR decomposition of a Gaussian. Seeded, so reproducible."""
    generator = torch.Generator().manual_seed(seed)
    found = _hadamard(n)
    if found is not None:
        signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1
        return found[0] * signs[None, :] / n**0.5
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]  # Haar-distributed, not biased by QR's signs


# -- finding the stream's readers and writers -----------------------------------------------------

@dataclass
class Layout:
    """Where the residual stream meets the weights (full module names)."""

    hidden: int
    norms: dict[str, list[str]]  # RMSNorm -> the linears reading its output
    writers: list[str]  # linears whose outputs are added into the stream

    @property
    def readers(self) -> list[str]:
        return [name for names in self.norms.values() for name in names]


# Operations that pass a tensor on without mixing its features (the last dimension), so whatever
# consumes their result consumes the stream as well: slicing tokens for the head, dtype casts.
VIEW_OPS = {"__getitem__", "view", "reshape", "contiguous", "to", "float", "type_as", "clone",
                "dropout"}
_ADDS = {"add", "__add__", "__radd__", "add_", "__iadd__"}
# Scaling by a number commutes with a rotation too (Granite's residual_multiplier, for example).
_SCALINGS = {"mul", "__mul__", "__rmul__", "div", "__truediv__"}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) or (isinstance(value, torch.Tensor) and value.dim() == 0)


class _Trace(TorchFunctionMode):
    """Follows the RMSNorms' outputs and the block linears' outputs through one forward pass."""

    def __init__(self, weights: dict[int, str], hidden: int):
        super().__init__()
        self.weights = weights  # id(linear weight) -> linear name
        self.hidden = hidden
        self.tracked: dict[int, tuple[str, str]] = {}  # id(tensor) -> ("norm" | "linear", name)
        self.keep: list[torch.Tensor] = []  # tracked tensors stay alive so ids are not reused
        self.readers: dict[str, list[str]] = {}
        self.foreign: dict[str, str] = {}  # norm -> the first non-linear operation reading it
        self.added: set[str] = set()  # linears whose output goes straight into an addition

    def track(self, tensor, kind: str, name: str) -> None:
        self.tracked[id(tensor)] = (kind, name)
        self.keep.append(tensor)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", str(func))
        if name == "linear" and isinstance(out, torch.Tensor):
            linear = self.weights.get(id(args[1]))
            if id(args[0]) in self.tracked and self.tracked[id(args[0])][0] == "norm":
                source = self.tracked[id(args[0])][1]
                if linear is None:
                    self.foreign.setdefault(source, "a linear outside the decoder blocks and head")
                elif linear not in self.readers.setdefault(source, []):
                    self.readers[source].append(linear)
            if linear is not None and out.shape[-1] == self.hidden:
                self.track(out, "linear", linear)  # a writer if it goes on into an addition
            return out
        inputs = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        sources = [self.tracked[id(a)] for a in inputs if id(a) in self.tracked]
        if not sources or not isinstance(out, torch.Tensor):
            return out  # nothing followed, or only a shape / size / dtype query
        scaling = name in _SCALINGS and sum(not _is_number(a) for a in args) == 1
        for kind, source in sources:
            if (name in VIEW_OPS or scaling) and out.shape[-1] == self.hidden:
                self.track(out, kind, source)
            elif kind == "norm":
                self.foreign.setdefault(source, name)
            elif name in _ADDS:
                self.added.add(source)
        return out


def _is_rms_norm(module, hidden: int) -> bool:
    """RMSNorm-like by its shape: a 1-D gain of the hidden size and no bias."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__.endswith("RMSNorm") and isinstance(weight, torch.Tensor)
            and weight.dim() == 1 and weight.numel() == hidden and getattr(module, "bias", None) is None)


@torch.no_grad()
def _check_rms_norm(name: str, module, hidden: int) -> None:
    """The gain must multiply x / rms(x) (Gemma's (1 + w) norms would not fold as w)."""
    weight = module.weight
    x = torch.randn(4, hidden, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 10
    expected = weight.double() * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True))
    got = module(x.to(weight.dtype)).double()
    tolerance = 1e-3 if weight.dtype in (torch.float32, torch.float64) else 3e-2
    if (got - expected).abs().max() > tolerance * expected.abs().max():
        raise CompressorError(f"cannot rotate: {name} ({type(module).__name__}) does not compute "
                              "gain * x / rms(x), so its gain cannot be folded")


@torch.no_grad()
def find_layout(model) -> Layout:
    """The stream's norms, readers and writers, found by one traced forward of a few tokens.
    Raises CompressorError (one line) for what cannot be rotated; changes nothing."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(embedding, torch.nn.Embedding) or not isinstance(head, torch.nn.Linear):
        raise CompressorError("cannot rotate: the model needs an nn.Embedding input and an nn.Linear head")
    hidden = embedding.weight.shape[1]
    prefix, blocks = decoder_blocks(model)
    norms = {}
    for name, module in model.named_modules():
        sizes = {p.numel() for p in module.parameters(recurse=False)}
        if _is_rms_norm(module, hidden):
            _check_rms_norm(name, module, hidden)
            norms[name] = module
        elif "norm" in type(module).__name__.lower() and hidden in sizes:
            # Mean subtraction (LayerNorm) or a bias does not commute with a rotation.
            raise CompressorError(f"cannot rotate: {name} is a {type(module).__name__}, not an RMSNorm "
                                  "without bias, so the residual stream cannot be rotated through it")
    if not norms:
        raise CompressorError("cannot rotate: no RMSNorm of the hidden size found")
    weights = {id(m.weight): f"{prefix}.{i}.{n}"
               for i, block in enumerate(blocks) for n, m in block_linears(block).items()}
    head_name = next(n for n, m in model.named_modules() if m is head)
    weights[id(head.weight)] = head_name
    trace = _Trace(weights, hidden)
    handles = [m.register_forward_hook(lambda mod, args, out, n=n: trace.track(out, "norm", n))
               for n, m in norms.items()]
    device = embedding.weight.device
    ids = torch.arange(4, device=device)[None, :] % embedding.weight.shape[0]
    try:
        with trace:
            model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    for name in norms:
        if name in trace.foreign:
            raise CompressorError(f"cannot rotate: the output of {name} goes into {trace.foreign[name]!r}, "
                                  "not only into linears, so its gain cannot be folded")
        if name not in trace.readers:
            raise CompressorError(f"cannot rotate: no linear reads the output of {name}")
    if head_name not in [n for names in trace.readers.values() for n in names]:
        raise CompressorError(f"cannot rotate: {head_name} does not read a final RMSNorm")
    readers = {n for names in trace.readers.values() for n in names}
    writers = [n for n in weights.values() if n in trace.added and n not in readers]
    for index, block in enumerate(blocks):
        names = {f"{prefix}.{index}.{n}": m for n, m in block_linears(block).items()}
        if not any(n in writers for n in names):
            raise CompressorError(f"cannot rotate: no linear of {prefix}.{index} adds its output to the "
                                  "residual stream as it is")
        # A hidden-sized output that neither reads the stream nor is added to it as it is: we cannot
        # tell whether it belongs to the stream, so we do not guess.
        unknown = [n for n, m in names.items() if m.out_features == hidden and n not in readers
                   and n not in writers]
        if unknown:
            raise CompressorError(f"cannot rotate: {unknown[0]} writes the hidden size but is not added "
                                  "to the residual stream as it is")
    return Layout(hidden=hidden, norms=trace.readers, writers=writers)


# -- the transforms ------------------------------------------------------------------------------

def _update(param: torch.Tensor, value: torch.Tensor) -> None:
    """Store a float64 result in the parameter's own dtype (the arithmetic is done in float64)."""
    param.data = value.to(param.dtype).contiguous()


def untie_embeddings(model) -> bool:
    """Give lm_head its own weight where it shares the embedding's; True when it did. The config
    says so too, so that save_pretrained writes both and from_pretrained does not re-tie them."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head.weight is embedding.weight or head.weight.data_ptr() == embedding.weight.data_ptr()
    if tied:
        head.weight = torch.nn.Parameter(embedding.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    text_config = getattr(model.config, "get_text_config", lambda: None)()
    if text_config is not None and text_config is not model.config:
        text_config.tie_word_embeddings = False
    # transformers 5 reads the config when it decides what to tie (from_pretrained, tie_weights()),
    # but a model keeps the mapping it computed at init in all_tied_weights_keys and ties by it
    # without recomputing in places (init_weights): recompute it, now empty, from the config.
    if hasattr(model, "all_tied_weights_keys") and hasattr(model, "get_expanded_tied_weights_keys"):
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)
    return tied


@torch.no_grad()
def fold_norms(model, layout: Layout | None = None) -> bool:
    """Multiply each RMSNorm's gain into the columns of the linears reading its output and set it
    to 1. Unties the embedding first (the head's copy gets the final norm's gain); returns whether
    it had to."""
    layout = layout or find_layout(model)
    untied = untie_embeddings(model)
    for norm_name, linears in layout.norms.items():
        norm = model.get_submodule(norm_name)
        gain = norm.weight.double()
        for name in linears:
            linear = model.get_submodule(name)
            _update(linear.weight, linear.weight.double() * gain[None, :])
        _update(norm.weight, torch.ones_like(gain))
    return untied


@torch.no_grad()
def rotate_residual(model, q: torch.Tensor, layout: Layout | None = None) -> None:
    """Rotate the residual stream by the orthogonal q (x -> x q); the norms must be folded first."""
    layout = layout or find_layout(model)
    q = q.double()
    if q.shape != (layout.hidden, layout.hidden):
        raise CompressorError(f"rotation is {tuple(q.shape)}, the hidden size is {layout.hidden}")
    for name, norm in ((n, model.get_submodule(n)) for n in layout.norms):
        if not torch.all(norm.weight == 1):
            raise CompressorError(f"cannot rotate: {name}'s gain is not folded (run fold_norms first)")
    embedding = model.get_input_embeddings()
    _update(embedding.weight, embedding.weight.double() @ q)
    for name in layout.readers:
        linear = model.get_submodule(name)
        _update(linear.weight, linear.weight.double() @ q)
    for name in layout.writers:
        linear = model.get_submodule(name)
        _update(linear.weight, q.T @ linear.weight.double())
        if linear.bias is not None:
            _update(linear.bias, q.T @ linear.bias.double())


def _attention_pairs(model) -> list[tuple[torch.nn.Linear, torch.nn.Linear, int]]:
    """(v_proj, o_proj, head_dim) of each decoder block, by their standard names."""
    _, blocks = decoder_blocks(model)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    pairs = []
    for index, block in enumerate(blocks):
        linears = block_linears(block)
        found = [(n.rsplit(".", 1)[0] if "." in n else "", n) for n in linears if n.endswith("v_proj")]
        if len(found) != 1 or f"{found[0][0]}.o_proj".lstrip(".") not in linears:
            raise CompressorError(f"cannot rotate heads: block {index} has no single v_proj / o_proj pair")
        parent, v_name = found[0]
        attention = block.get_submodule(parent) if parent else block
        head_dim = getattr(attention, "head_dim", None) or getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads)
        v, o = linears[v_name], linears[f"{parent}.o_proj".lstrip(".")]
        if v.out_features % head_dim or o.in_features % head_dim:
            raise CompressorError(f"cannot rotate heads: block {index}'s v_proj / o_proj are not whole "
                                  f"heads of {head_dim}")
        pairs.append((v, o, head_dim))
    return pairs


@torch.no_grad()
def rotate_heads(model, seed: int = 0) -> str:
    """R2: each head's values times an orthogonal H (v_proj rows), o_proj's columns of that head
    times H^T. The same H for every head and block, so grouped-query heads stay consistent.
    Returns the label of H (rotation_label)."""
    pairs = _attention_pairs(model)  # every block checked before anything changes
    rotations = {dim: orthogonal_matrix(dim, seed) for _, _, dim in pairs}
    for v, o, dim in pairs:
        h_block = rotations[dim]
        # v rows [heads * d, in] -> per head H @ rows;  o columns [out, heads * d] -> per head cols @ H^T
        w = v.weight.double().reshape(-1, dim, v.in_features)
        _update(v.weight, (h_block @ w).reshape(v.out_features, v.in_features))
        if v.bias is not None:
            _update(v.bias, (h_block @ v.bias.double().reshape(-1, dim, 1)).reshape(-1))
        w = o.weight.double().reshape(o.out_features, -1, dim)
        _update(o.weight, (w @ h_block.T).reshape(o.out_features, o.in_features))
    return rotation_label(pairs[0][2])
