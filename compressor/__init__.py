"""compressor: make Hugging Face causal LMs smaller and measure what it cost."""

__version__ = "0.1.0"
