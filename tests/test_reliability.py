"""Streaming, resume, determinism, multi-process calibration and hostile input (issue: scale and
reliability). A 4-block bfloat16 Llama with an untied head stands in for a large model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compressor import job as job_module
from compressor.job import Calibration, run_compression
from compressor.model import ModelSource
from compressor.writer import folder_checksum, staging_folder

from .conftest import REPO, make_tokenizer

GPTQ = {"passes": [{"method": "gptq", "bits": 4, "group_size": 32, "symmetric": False}]}
PRUNE_THEN_QUANT = {"passes": [{"method": "sparsegpt", "pattern": "2:4"},
                               {"method": "gptq", "bits": 4, "group_size": 32}]}


@pytest.fixture(scope="module")
def deep_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("proj.weight"):
                param.mul_(3.0)
    folder = tmp_path_factory.mktemp("deep")
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def calibration(path) -> Calibration:
    return Calibration(source=str(path), samples=6, seqlen=32, batch_size=2)


def compress(folder, out, calibration_file, recipe=GPTQ, **kwargs):
    return run_compression(ModelSource(str(folder)), recipe, out, calibration(calibration_file), "cpu",
                           **kwargs).manifest


def test_streamed_run_matches_in_memory_run_byte_for_byte(deep_dir, calibration_file, tmp_path,
                                                          monkeypatch):
    streamed = compress(deep_dir, tmp_path / "streamed", calibration_file, PRUNE_THEN_QUANT)
    monkeypatch.setattr(job_module, "can_stream", lambda source: False)
    whole = compress(deep_dir, tmp_path / "whole", calibration_file, PRUNE_THEN_QUANT)
    assert streamed["streamed"] and not whole["streamed"]
    assert streamed["checksum"] == whole["checksum"]
    assert streamed["checksum"] == folder_checksum(tmp_path / "streamed")
    config = json.loads((tmp_path / "streamed" / "config.json").read_text())
    assert config["quantization_config"]["sparsity_config"]["global_sparsity"] == pytest.approx(0.5)


def test_streaming_keeps_one_block_in_memory(deep_dir, calibration_file, tmp_path, monkeypatch):
    from compressor.stream import StreamedModel

    seen = []
    original = StreamedModel.load_block

    def spy(self, index, block):
        original(self, index, block)
        real = [i for i, b in enumerate(self.blocks) if any(not p.is_meta for p in b.parameters())]
        embeddings = self.model.get_input_embeddings().weight
        seen.append((index, real, embeddings.is_meta, self.model.lm_head.weight.is_meta))

    monkeypatch.setattr(StreamedModel, "load_block", spy)
    compress(deep_dir, tmp_path / "o", calibration_file)
    assert seen == [(i, [i], True, True) for i in range(4)]


def test_output_loads_in_transformers_and_matches_dequantized_logits(deep_dir, calibration_file, tmp_path):
    from transformers import AutoModelForCausalLM

    compress(deep_dir, tmp_path / "o", calibration_file)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "o", dtype=torch.float32).eval()
    ids = torch.randint(0, 320, (1, 16))
    logits = model(ids).logits
    assert torch.isfinite(logits).all()
    import compressor

    ours, _ = compressor.load(tmp_path / "o", dtype=torch.float32)
    # The checkpoint is bfloat16 and asymmetric: transformers dequantizes while loading (the config
    # says so, compressor.pack), in the scales' dtype, so its float32 weights carry bfloat16 rounding
    # that the packed runtime's float32 products do not.
    torch.testing.assert_close(ours(ids).logits, logits, rtol=1e-2, atol=1e-2)


def test_same_inputs_and_seed_give_identical_bytes(deep_dir, calibration_file, tmp_path):
    first = compress(deep_dir, tmp_path / "a", calibration_file)
    second = compress(deep_dir, tmp_path / "b", calibration_file)
    assert first["checksum"]["sha256"] == second["checksum"]["sha256"]
    other = run_compression(ModelSource(str(deep_dir)), GPTQ, tmp_path / "c",
                            Calibration(str(calibration_file), 6, 32, seed=1, batch_size=2), "cpu").manifest
    assert other["checksum"]["sha256"] != first["checksum"]["sha256"]


def _interrupt_after(monkeypatch, block: int, error=KeyboardInterrupt):
    original = job_module.WriteEachBlock.done

    def done(self, index, *args):
        original(self, index, *args)
        if index == block:
            raise error()

    monkeypatch.setattr(job_module.WriteEachBlock, "done", done)


def test_resume_after_interrupt_gives_the_uninterrupted_checkpoint(deep_dir, calibration_file, tmp_path,
                                                                   monkeypatch):
    reference = compress(deep_dir, tmp_path / "reference", calibration_file)
    out = tmp_path / "o"
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 1)
        with pytest.raises(KeyboardInterrupt):
            compress(deep_dir, out, calibration_file)
    assert not out.exists()
    progress = json.loads((staging_folder(out) / ".resume" / "progress.json").read_text())
    assert progress["blocks_done"] == 2
    resumed = compress(deep_dir, out, calibration_file, resume=True)
    assert resumed["resumed_at_block"] == 2
    assert resumed["checksum"] == reference["checksum"]
    assert not staging_folder(out).exists()
    assert resumed["modules"].keys() == reference["modules"].keys()


def test_failure_removes_the_staging_folder(deep_dir, calibration_file, tmp_path, monkeypatch):
    _interrupt_after(monkeypatch, 1, error=lambda: RuntimeError("simulated crash"))
    with pytest.raises(RuntimeError):
        compress(deep_dir, tmp_path / "o", calibration_file)
    assert list(tmp_path.iterdir()) == []


def test_resume_refuses_other_settings_and_missing_runs(deep_dir, calibration_file, tmp_path, monkeypatch):
    from compressor.errors import CompressorError

    with pytest.raises(CompressorError, match="nothing to resume"):
        compress(deep_dir, tmp_path / "o", calibration_file, resume=True)
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 0)
        with pytest.raises(KeyboardInterrupt):
            compress(deep_dir, tmp_path / "o", calibration_file)
    other = {"passes": [{**GPTQ["passes"][0], "bits": 3}]}
    with pytest.raises(CompressorError, match="other settings .*recipe"):
        compress(deep_dir, tmp_path / "o", calibration_file, recipe=other, resume=True)


KILL_SCRIPT = """
import os, signal, sys
from compressor import job
from compressor.cli import main
original = job.WriteEachBlock.done
def done(self, index, *args):
    original(self, index, *args)
    if index == 1:
        os.kill(os.getpid(), signal.SIGKILL)
job.WriteEachBlock.done = done
sys.argv = ["compress"] + sys.argv[1:]
main()
"""


def _cli(args, script=None):
    command = [sys.executable, "-c", script] if script else [sys.executable, "-m", "compressor"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "kernels")])}
    return subprocess.run(command + [str(a) for a in args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_sigkill_then_resume_is_byte_identical(deep_dir, calibration_file, tmp_path):
    args = ["quantize", deep_dir, "--bits", "4", "--group-size", "32", "--asym", "--calibration",
            calibration_file, "--samples", "6", "--seqlen", "32", "--batch-size", "2", "--device", "cpu"]
    # Killed and resumed with --low-memory, compared with the lockstep run.
    killed = _cli([*args, "--low-memory", "-o", tmp_path / "o"], script=KILL_SCRIPT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (tmp_path / "o").exists() and staging_folder(tmp_path / "o").is_dir()
    resumed = _cli([*args, "--low-memory", "-o", tmp_path / "o", "--resume", "--json"])
    assert resumed.returncode == 0, resumed.stderr
    whole = _cli([*args, "-o", tmp_path / "whole", "--json"])
    assert whole.returncode == 0, whole.stderr
    assert json.loads(resumed.stdout)["resumed_at_block"] == 2
    assert json.loads(resumed.stdout)["checksum"] == json.loads(whole.stdout)["checksum"]


def test_torchrun_two_ranks_give_the_weights_of_one(deep_dir, calibration_file, tmp_path):
    """Gloo all-reduce of the Hessians: the same GPTQ weights up to float summation order."""

    args = ["quantize", deep_dir, "--bits", "4", "--group-size", "32", "--asym", "--calibration",
            calibration_file, "--samples", "6", "--seqlen", "32", "--batch-size", "1", "--device", "cpu"]
    one = _cli([*args, "-o", tmp_path / "one"])
    assert one.returncode == 0, one.stderr
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "kernels")]),
           "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "compressor", *map(str, args), "-o", str(tmp_path / "two"), "--json"],
        capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    manifest = json.loads((tmp_path / "two" / "compress.json").read_text())
    assert manifest["world_size"] == 2 and manifest["calibration"]["samples"] == 6
    a, b = (_dense_weights(tmp_path / name) for name in ("one", "two"))
    assert a.keys() == b.keys() and len(a) == 4 * 7
    for name in a:
        # A weight whose value sat on a rounding boundary may land one grid step away.
        close = torch.isclose(a[name], b[name], rtol=1e-3, atol=1e-5).float().mean()
        assert close > 0.99, (name, close)


def _dense_weights(folder) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, quantization_config=CompressedTensorsConfig(run_compressed=False))
    return {name: module.weight.detach().clone() for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and ".layers." in name}


def _tree_digest(folder: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


FULL_DISK_SCRIPT = """
import resource, signal, sys
# A file-size limit makes writes fail as on a full disk (EFBIG instead of ENOSPC), with no mount.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
from compressor.cli import main
sys.argv = ["compress"] + sys.argv[2:]
main()
"""


@pytest.mark.parametrize("limit", [4_000, 100_000])
def test_full_disk_is_one_line_and_leaves_nothing(deep_dir, calibration_file, tmp_path, limit):
    """4 kB: the first block file fails; 100 kB: the blocks fit, the regrouped shard does not."""
    before = _tree_digest(deep_dir)
    work = tmp_path / "work"
    work.mkdir()
    result = _cli([limit, "quantize", deep_dir, "--bits", "4", "--group-size", "32", "--calibration",
                   calibration_file, "--samples", "6", "--seqlen", "32", "-o", work / "o"],
                  script=FULL_DISK_SCRIPT)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot write"), result.stderr
    assert "File too large" in lines[0] or "No space" in lines[0]
    assert list(work.iterdir()) == []
    assert _tree_digest(deep_dir) == before  # the input is never written to


def test_low_memory_mode_gives_the_same_bytes(deep_dir, calibration_file, tmp_path):
    """Recomputing each sub-group's inputs chunk by chunk equals the lockstep pipeline exactly."""
    lockstep = compress(deep_dir, tmp_path / "a", calibration_file, PRUNE_THEN_QUANT)
    recomputed = compress(deep_dir, tmp_path / "b", calibration_file, PRUNE_THEN_QUANT, low_memory=True)
    assert recomputed["low_memory"] and not lockstep["low_memory"]
    assert recomputed["checksum"] == lockstep["checksum"]


def test_unfamiliar_tensor_names_fall_back_to_a_whole_load(deep_dir, calibration_file, tmp_path,
                                                          monkeypatch):
    from compressor.stream import NamesDiffer

    streamed = compress(deep_dir, tmp_path / "a", calibration_file)

    def renamed(source):
        raise NamesDiffer("the weights lack 1 tensors the config implies")

    monkeypatch.setattr(job_module, "StreamedModel", renamed)
    whole = compress(deep_dir, tmp_path / "b", calibration_file)
    assert not whole["streamed"] and whole["checksum"] == streamed["checksum"]


def test_full_tmpfs_is_one_line_and_leaves_nothing(deep_dir, calibration_file, tmp_path):
    """A real ENOSPC: a 100 kB tmpfs mounted in a private mount namespace (skipped where the
    machine does not allow one)."""
    import shlex
    import shutil as sh

    work = tmp_path / "small-disk"
    work.mkdir()
    if sh.which("unshare") is None or subprocess.run(
            ["unshare", "-rm", "mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(work)],
            capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs in a user namespace here")
    command = [sys.executable, "-m", "compressor", "quantize", str(deep_dir), "--bits", "4",
               "--group-size", "32", "--calibration", str(calibration_file), "--samples", "6",
               "--seqlen", "32", "-o", str(work / "o")]
    script = (f"mount -t tmpfs -o size=100k tmpfs {shlex.quote(str(work))} && "
              f"{shlex.join(command)}; echo status=$?; ls -A {shlex.quote(str(work))}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "kernels")])}
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True,
                            env=env, timeout=600)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot write"), result.stderr
    assert "No space left on device" in lines[0]
    assert result.stdout.strip().splitlines() == ["status=2"]  # and the folder is empty


TRITON_PROBE = """
import sys
from compressor.cli import leave_out_triton_on_cpu
leave_out_triton_on_cpu(sys.argv[1:])
import transformers.modeling_utils  # imports torch._dynamo, which imports Triton when it can
print("triton" if sys.modules.get("triton") is not None else "none")
"""


@pytest.mark.parametrize(("argv", "expected"), [
    (["quantize", "--low-memory", "--device", "cpu"], "none"),
    (["quantize", "--device=cpu", "--low-memory"], "none"),
    (["quantize", "--device", "cpu"], "triton"),  # only --low-memory runs trade it away
])
def test_low_memory_cpu_runs_leave_triton_out(argv, expected):
    pytest.importorskip("triton")
    probe = subprocess.run([sys.executable, "-c", TRITON_PROBE, *argv], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, timeout=300)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split()[-1] == expected


def test_peak_rss_is_the_process_own_not_its_launchers():
    """A process started by a large one reports its own peak (Linux ru_maxrss would carry the
    launcher's across exec, which made a benchmark child report 4.8 GB)."""
    from compressor.writer import peak_rss_mb

    ballast = b"\x01" * (1200 * 2**20)  # resident in this process
    assert peak_rss_mb() > 1200
    probe = "from compressor.writer import peak_rss_mb; print(peak_rss_mb())"
    child = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    del ballast
    assert child.returncode == 0, child.stderr
    assert 50 < float(child.stdout.split()[-1]) < 1000
