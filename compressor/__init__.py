"""compressor: make Hugging Face causal LMs smaller and measure what it cost."""

__version__ = "0.1.0"


def load(folder, dtype="auto", device="cpu", embeddings="keep", backend=None):
    """(model, tokenizer) of a compressed checkpoint with its quantized linears kept packed
    (embeddings="int8" also packs the token embedding and a tied head; on CUDA the Triton kernels;
    backend forces one kernel for every layer; see compressor.runtime)."""
    from compressor.runtime import load as load_packed

    return load_packed(folder, dtype, device, embeddings, backend)
