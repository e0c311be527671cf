"""compressor: make Hugging Face causal LMs smaller and measure what it cost."""

__version__ = "0.1.0"


def load(folder, dtype="auto", device="cpu", embeddings="keep", backend=None):
    """(model, tokenizer) of a compressed checkpoint with its quantized linears kept packed
    (embeddings="int8" also packs the token embedding and a tied head; on CUDA the Triton kernels;
    backend forces one kernel for every layer; see compressor.runtime)."""
    from compressor.runtime import load as load_packed

    return load_packed(folder, dtype, device, embeddings, backend)


def quantize(model=None, output=None, **options):
    """Quantize MODEL as `compress quantize` does; the CLI's options as keywords (compressor.api)."""
    from compressor.api import quantize as run

    return run(model, output, **options)


def sparsify(model=None, output=None, **options):
    """Prune MODEL as `compress sparsify` does; the CLI's options as keywords (compressor.api)."""
    from compressor.api import sparsify as run

    return run(model, output, **options)


def run(recipe, model=None, output=None, **options):
    """Run a recipe (YAML path or dict) over MODEL as `compress run` does (compressor.api)."""
    from compressor.api import run as run_recipe

    return run_recipe(recipe, model, output, **options)
