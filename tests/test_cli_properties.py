"""Property-based tests of the CLI's arguments (hypothesis): whatever a user types, the command
either succeeds or fails with exit status 2 and a message, never a traceback, and a failure leaves
no output or staging folder behind."""

from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compressor.budget import parse_budget
from compressor.errors import CompressorError

from .test_cli import run_cli

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
NUMBER_LIKE = st.one_of(
    st.integers(-300, 300).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.text(alphabet="0123456789.-+eEx: abc", max_size=6),
)


def _outcome(code: int, stderr: str, out) -> None:
    assert "Traceback" not in stderr
    assert code in (0, 2), stderr
    if code == 2:
        assert "error" in stderr.lower() or "invalid value" in stderr.lower(), stderr
        assert not out.exists()
        assert not any(p.name.startswith(f".{out.name}.") for p in out.parent.iterdir())
    else:
        assert (out / "compress.json").is_file()


@SETTINGS
@given(bits=NUMBER_LIKE, group_size=NUMBER_LIKE)
def test_quantize_bits_and_group_size(bits, group_size, llama_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    shutil.rmtree(out, ignore_errors=True)
    code, stdout, stderr = run_cli(["quantize", llama_dir, "--method", "rtn", "--bits", bits,
                                    "--group-size", group_size, "-o", out, "--json"], capsys, monkeypatch)
    _outcome(code, stderr, out)
    if code == 0:
        manifest = json.loads(stdout)
        assert manifest["bpw"]["levels"] == float(bits) == int(float(bits))
        assert 2 <= manifest["bpw"]["levels"] <= 8


@SETTINGS
@given(pattern=st.text(alphabet="0123456789:", max_size=5), method=st.sampled_from(["magnitude", "wanda"]))
def test_sparsify_patterns(pattern, method, llama_dir, calibration_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    shutil.rmtree(out, ignore_errors=True)
    code, _, stderr = run_cli(["sparsify", llama_dir, "--method", method, "--pattern", pattern,
                               "--calibration", calibration_file, "--samples", "2", "--seqlen", "16",
                               "-o", out], capsys, monkeypatch)
    _outcome(code, stderr, out)
    if code == 0:
        n, m = (int(x) for x in pattern.split(":"))
        config = json.loads((out / "config.json").read_text())
        assert config["quantization_config"]["sparsity_config"]["global_sparsity"] == pytest.approx(1 - n / m)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(text=st.text(max_size=12))
def test_budget_parser_accepts_or_refuses_cleanly(text):
    try:
        budget = parse_budget(text)
    except CompressorError as error:
        assert str(error)
    else:
        assert budget.kind in ("bpw", "bits", "sparsity")
        assert budget.value > 0
