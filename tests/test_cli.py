"""The `compress` command end to end on tiny models, and every bad input it must refuse cleanly."""

import json
import sys

import pytest
import torch

from compressor.cli import main


def run_cli(args, capsys, monkeypatch):
    """Run `compress ARGS` in-process; returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["compress", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as done:
        code = done.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_small_eval(folder, tmp_path, capsys, monkeypatch, windows=2):
    """`compress eval FOLDER --json` on a short local text: seqlen 64, KL on 2 x 32 tokens."""
    text = tmp_path / "eval.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    return run_cli(["eval", folder, "--dataset", text, "--seqlen", "64", "--windows", str(windows),
                    "--kl-seqlen", "32", "--kl-windows", "2", "--json"], capsys, monkeypatch)


def test_quantize_eval_inspect_round(llama_dir, calibration_file, tmp_path, capsys, monkeypatch,
                                     isolated_cache):
    out = tmp_path / "w4"
    code, stdout, stderr = run_cli(
        ["quantize", llama_dir, "--bits", "4", "--group-size", "32", "--calibration", calibration_file,
         "--samples", "4", "--seqlen", "32", "-o", out, "--json"], capsys, monkeypatch)
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["output"] == str(out)
    assert summary["bpw"]["levels"] == 4
    assert summary["calibration"]["samples"] == 4
    assert set(summary["seconds"]) >= {"load", "compress", "write"}
    manifest = json.loads((out / "compress.json").read_text())
    assert manifest["modules"]["model.layers.0.mlp.down_proj"]["methods"] == ["gptq"]
    assert (out / "recipe.yaml").is_file()

    code, stdout, stderr = run_small_eval(out, tmp_path, capsys, monkeypatch, windows=4)
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["perplexity"]["windows"] == 4 and result["perplexity"]["seqlen"] == 64
    assert result["baseline"] == str(llama_dir)
    assert result["kl"]["kl"] > 0
    assert result["perplexity"]["ppl"] > 1 and result["baseline_perplexity"]["ppl"] > 1
    assert (out / "eval.json").is_file() and "seqlen 64" in (out / "eval.md").read_text()

    code, stdout, _ = run_cli(["inspect", out, "--json"], capsys, monkeypatch)
    assert code == 0
    assert len(json.loads(stdout)["modules"]) == 14


def test_run_recipe(llama_dir, tmp_path, capsys, monkeypatch):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - method: rtn\n    bits: 3\n    group_size: 32\n    symmetric: false\n")
    code, stdout, stderr = run_cli(["run", recipe, llama_dir, "-o", tmp_path / "o", "--json"],
                                   capsys, monkeypatch)
    assert code == 0, stderr
    assert json.loads(stdout)["recipe"]["passes"][0]["bits"] == 3


def corrupt_copy(src, dst, mutate):
    import shutil

    shutil.copytree(src, dst)
    mutate(dst)
    return dst


BAD_INPUTS = {
    "missing model": (lambda d, t: ["quantize", t / "nope", "-o", t / "o"], "model not found"),
    "bits 9": (lambda d, t: ["quantize", d, "--bits", "9", "-o", t / "o"], "bits must be"),
    "bits 1": (lambda d, t: ["quantize", d, "--bits", "1", "-o", t / "o"], "bits must be"),
    "group size -5": (lambda d, t: ["quantize", d, "--group-size", "-5", "-o", t / "o"],
                      "group size must be"),
    "unknown method": (lambda d, t: ["quantize", d, "--method", "awq", "-o", t / "o"], "unknown --method"),
    "empty calibration": (lambda d, t: ["quantize", d, "--calibration", _empty(t), "-o", t / "o"],
                          "empty"),
    "short calibration": (lambda d, t: ["quantize", d, "--calibration", _short(t), "--seqlen", "512",
                                        "-o", t / "o"], "512"),
    "not a causal LM": (lambda d, t: ["quantize", _bert(t), "-o", t / "o"], "not a causal language model"),
    "corrupt safetensors": (lambda d, t: ["quantize", _truncated(d, t), "-o", t / "o"],
                            "truncated safetensors"),
    "garbage safetensors": (lambda d, t: ["quantize", _garbage(d, t), "-o", t / "o"], "corrupt safetensors"),
    "missing shard": (lambda d, t: ["quantize", _missing_shard(d, t), "-o", t / "o"], "missing"),
    "NaN weights": (lambda d, t: ["quantize", _nan_weights(d, t), "-o", t / "o"], "NaN or Inf"),
    "config/weight shape mismatch": (lambda d, t: ["quantize", _wider_config(d, t), "-o", t / "o"],
                                     "in config.json"),
    "tokenizer missing": (lambda d, t: ["quantize", _no_tokenizer(d, t), "-o", t / "o"], "tokenizer"),
    "folder without config": (lambda d, t: ["quantize", t, "-o", t / "o"], "no config.json"),
    "output exists": (lambda d, t: ["quantize", d, "--method", "rtn", "-o", _existing(t)], "--overwrite"),
    "unknown device": (lambda d, t: ["quantize", d, "--device", "tpu", "-o", t / "o"], "unknown device"),
    "missing recipe": (lambda d, t: ["run", t / "r.yaml", d, "-o", t / "o"], "recipe not found"),
    "bad recipe key": (lambda d, t: ["run", _recipe(t, "method: rtn\n    group-size: 32"), d, "-o", t / "o"],
                       "unknown setting"),
    "eval missing folder": (lambda d, t: ["eval", t / "nope"], "model not found"),
    "inspect not a checkpoint": (lambda d, t: ["inspect", t], "no config.json"),
    "missing data dir": (lambda d, t: ["quantize", d, "--data-dir", t / "nodata", "-o", t / "o"],
                         "does not exist"),
}


def _empty(t):
    (t / "empty.jsonl").write_text("")
    return t / "empty.jsonl"


def _short(t):
    (t / "short.txt").write_text("just a few words")
    return t / "short.txt"


def _bert(t):
    from transformers import DistilBertConfig, DistilBertModel

    folder = t / "distilbert"  # an encoder with no causal-LM head in transformers
    config = DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=32)
    DistilBertModel(config).save_pretrained(folder)
    return folder


def _truncated(d, t):
    def cut(folder):
        path = folder / "model.safetensors"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    return corrupt_copy(d, t / "truncated", cut)


def _garbage(d, t):
    return corrupt_copy(d, t / "garbage", lambda f: (f / "model.safetensors").write_bytes(b"\x10" * 64))


def _missing_shard(d, t):
    def shard(folder):
        shard = "model-00002-of-00002.safetensors"
        index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": shard}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))

    return corrupt_copy(d, t / "sharded", shard)


def _nan_weights(d, t):
    from safetensors.torch import load_file, save_file

    def poison(folder):
        tensors = load_file(folder / "model.safetensors")
        tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})

    return corrupt_copy(d, t / "nan", poison)


def _wider_config(d, t):
    def widen(folder):
        config = json.loads((folder / "config.json").read_text())
        config["intermediate_size"] += 32
        (folder / "config.json").write_text(json.dumps(config))

    return corrupt_copy(d, t / "wider", widen)


def _no_tokenizer(d, t):
    def strip(folder):
        for path in folder.glob("tokenizer*"):
            path.unlink()
        (folder / "special_tokens_map.json").unlink(missing_ok=True)

    return corrupt_copy(d, t / "notok", strip)


def _existing(t):
    (t / "taken").mkdir()
    (t / "taken" / "keep.txt").write_text("mine")
    return t / "taken"


def _recipe(t, body):
    path = t / "bad.yaml"
    path.write_text(f"passes:\n  - {body}\n")
    return path


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_clear_line(case, llama_dir, tmp_path, capsys, monkeypatch):
    make_args, expected = BAD_INPUTS[case]
    work = tmp_path / "work"
    work.mkdir()
    before = set(work.iterdir())
    code, stdout, stderr = run_cli(make_args(llama_dir, work), capsys, monkeypatch)
    assert code == 2, (stdout, stderr)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    assert expected in lines[0]
    assert "Traceback" not in stderr
    # Nothing half-written: no output folder, no staging folder.
    new = {p.name for p in set(work.iterdir()) - before}
    assert not {n for n in new if n == "o" or n.startswith(".o.")}
    if case == "output exists":
        assert (work / "taken" / "keep.txt").read_text() == "mine"


def test_failure_midway_leaves_no_output(llama_dir, tmp_path, monkeypatch, capsys):
    """A crash while compressing must leave neither the output nor a staging folder."""
    import compressor.pipeline as pipeline

    def boom(*args, **kwargs):
        raise torch.linalg.LinAlgError("simulated failure")

    monkeypatch.setattr(pipeline, "_store", boom)
    with pytest.raises(torch.linalg.LinAlgError):
        monkeypatch.setattr(sys, "argv", ["compress", "quantize", str(llama_dir), "--method", "rtn",
                                          "-o", str(tmp_path / "o")])
        main()
    assert list(tmp_path.iterdir()) == []


def test_help_lists_every_command(capsys, monkeypatch):
    code, stdout, _ = run_cli(["--help"], capsys, monkeypatch)
    assert code == 0
    for command in ("quantize", "run", "eval", "inspect"):
        assert command in stdout
    code, stdout, _ = run_cli(["quantize", "--help"], capsys, monkeypatch)
    for option in ("--bits", "--group-size", "--sym", "--method", "--act-order", "--calibration",
                   "--samples", "--seqlen", "--seed", "--device", "--output", "--json", "--overwrite"):
        assert option in stdout


def test_resolve_source_reads_a_folder_named_like_a_gguf_file(tmp_path, llama_dir):
    """`compress run recipe MODEL -o x.gguf` with a pass that writes a folder names it x.gguf: later
    commands read it as the folder it is; a missing x.gguf is still one clear line."""
    import shutil

    from compressor.errors import CompressorError
    from compressor.model import resolve_source

    folder = tmp_path / "run.gguf"
    shutil.copytree(llama_dir, folder)
    source = resolve_source(str(folder))
    assert source.path == str(folder) and not source.gguf_file
    with pytest.raises(CompressorError, match="model file not found"):
        resolve_source(str(tmp_path / "missing.gguf"))
