"""Writing a compressed checkpoint block by block, so a run can be resumed after a crash or a kill.

Everything goes to a staging folder beside the output, `.NAME.partial`, renamed to NAME only when
the checkpoint is complete:

    block-00003.safetensors      each decoder block's tensors (packed), written when it is done
    .resume/progress.json        which run this is (its settings) and how many blocks are done
    .resume/records-00003.pt     what was done to the block's linears (no tensors: for the config)
    .resume/hidden-r0-00003.safetensors  the calibration hidden states leaving the block (one file per rank)

Each file is written under a temporary name and renamed, and progress.json is updated last, so
after a kill at any point the folder describes a consistent prefix of blocks. `--resume` checks
the settings, reads the hidden states of the last finished block and carries on; the result is
the same checkpoint, byte for byte, as an uninterrupted run.

At the end the block files and the tensors outside the blocks are regrouped into shards of at
most SHARD_BYTES (one model.safetensors for a small model), the config, tokenizer and manifest
are added, and the folder is renamed into place. compress.json records a SHA-256 of every file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import torch
from safetensors.torch import save_file

from compressor import distributed
from compressor.errors import CompressorError
from compressor.files import INDEX_NAME, WEIGHTS_NAME, atomic_write
from compressor.fp4load import guard_config
from compressor.model import OWN_QUANT_METHODS
from compressor.pack import (
    Target,
    block_layers,
    check_output,
    module_tensors,
    quantization_config,
    unpack_block_zero_points,
)
from compressor.passes import LinearState
from compressor.stream import SafetensorsReader

SHARD_BYTES = 256 * 2**20  # regrouping reads a shard into memory: this bounds it
RESUME_FOLDER = ".resume"
PROGRESS = "progress.json"
MANIFEST = "compress.json"


def staging_folder(output: Path) -> Path:
    return output.with_name(f".{output.name}.partial")


def peak_rss_mb() -> float:
    """This process's peak resident set size, MiB. Linux: VmHWM, the high-water mark of this
    process's own memory. ru_maxrss is not used there: a process started by a large one (Python's
    subprocess uses vfork) inherits the launcher's peak in it at exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 2**20)


def _pickled(value) -> bytes:
    """torch.save into memory: written by Python, a failed write names its OS error (torch's own
    file writer reports a full disk as "unexpected pos")."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def lighten(state: LinearState) -> LinearState:
    """The record without its tensors (shapes kept on the meta device): what the config and the
    manifest need once the block is written, at no memory cost."""
    if state.mask is not None:
        state.metrics.setdefault("pruned_weights", int((~state.mask).sum()))
        state.mask = state.mask.to("meta")
    if state.quant is not None:
        for item in fields(state.quant):
            value = getattr(state.quant, item.name)
            if isinstance(value, torch.Tensor):
                setattr(state.quant, item.name, value.to("meta"))
    state.weight = state.original = state.unrounded = None
    return state


class CheckpointWriter:
    """Staging folder, block files, resume state and the final assembly of one output checkpoint.

    In a distributed run every rank keeps its own hidden states; only rank 0 writes the rest.
    """

    def __init__(self, output: Path, identity: dict, overwrite: bool = False, resume: bool = False):
        self.output = Path(output)
        self.identity = json.loads(json.dumps(identity, default=str))
        self.staging = staging_folder(self.output)
        self.resume_dir = self.staging / RESUME_FOLDER
        self.writes = distributed.rank() == 0
        check_output(self.output, overwrite)
        self.blocks_done = 0
        if resume:
            self.blocks_done = self._read_progress()
        elif self.writes:
            shutil.rmtree(self.staging, ignore_errors=True)  # a stale run of other settings
        distributed.barrier()
        self.resume_dir.mkdir(parents=True, exist_ok=True)

    def _read_progress(self) -> int:
        path = self.resume_dir / PROGRESS
        if not path.is_file():
            raise CompressorError(f"nothing to resume: no interrupted run in {self.staging}")
        try:
            progress = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise CompressorError(f"{path} is not valid JSON: {error}")
        if progress.get("identity") != self.identity:
            changed = sorted(k for k in set(self.identity) | set(progress.get("identity", {}))
                             if self.identity.get(k) != progress.get("identity", {}).get(k))
            raise CompressorError(f"the interrupted run in {self.staging} used other settings "
                                  f"({', '.join(changed)}); drop --resume to start over")
        return int(progress["blocks_done"])

    # -- during the run ------------------------------------------------------------------------
    def write_block(self, index: int, tensors: dict[str, torch.Tensor], records: dict[str, LinearState],
                    hidden: list[torch.Tensor] | None) -> None:
        if hidden is not None:
            chunks = {f"chunk-{i:05d}": h.detach().cpu().contiguous() for i, h in enumerate(hidden)}
            atomic_write(self._hidden_path(index), lambda p: save_file(chunks, p))
        if self.writes:
            atomic_write(self.staging / f"block-{index:05d}.safetensors",
                         lambda p: save_file(tensors, p, metadata={"format": "pt"}))
            atomic_write(self.resume_dir / f"records-{index:05d}.pt",
                         lambda p: p.write_bytes(_pickled(records)))
        distributed.barrier()  # every rank's hidden states are on disk before progress says so
        if self.writes:
            atomic_write(self.resume_dir / PROGRESS, lambda p: p.write_text(json.dumps(
                {"identity": self.identity, "blocks_done": index + 1}, indent=1)))
        distributed.barrier()
        if index > 0:
            self._hidden_path(index - 1).unlink(missing_ok=True)
        self.blocks_done = index + 1

    def _hidden_path(self, index: int) -> Path:
        return self.resume_dir / f"hidden-r{distributed.rank()}-{index:05d}.safetensors"

    def resumed_hidden(self) -> list[torch.Tensor] | None:
        """The hidden states leaving the last finished block, or None when nothing was saved."""
        if self.blocks_done == 0:
            return None
        path = self._hidden_path(self.blocks_done - 1)
        if not path.is_file():
            return None
        reader = SafetensorsReader.of_file(path)
        return [reader.read(key) for key in sorted(reader.keys())]

    def resumed_records(self) -> dict[str, LinearState]:
        records: dict[str, LinearState] = {}
        for index in range(self.blocks_done):
            records.update(torch.load(self.resume_dir / f"records-{index:05d}.pt", weights_only=False))
        return records

    # -- at the end ------------------------------------------------------------------------------
    def finish(self, model, tokenizer, records: dict[str, LinearState], ignore: list[str],
               outside_tensors: Callable[[], dict[str, torch.Tensor]], manifest: dict,
               extra_files: dict[str, str], target: Target | str = Target.ANY) -> int:
        """Assemble the checkpoint, add config/tokenizer/manifest, rename into place. The tensors
        outside the blocks are made, written and dropped before the shards are assembled, and the
        manifest's peak RSS and write time cover all of it. Returns the bytes of weights. Only
        rank 0 does anything."""
        if not self.writes:
            return 0
        started = time.perf_counter()
        outside = outside_tensors()
        atomic_write(self.staging / "outside.safetensors",
                     lambda p, tensors=outside: save_file(tensors, p, metadata={"format": "pt"}))
        del outside
        weight_bytes = self._regroup(records, block_layers(records, target))
        try:
            save_config(model, tokenizer, records, ignore, self.staging, target)
        except OSError as error:
            raise CompressorError(f"cannot write the config and tokenizer to {self.staging}: {error}")
        for name, text in extra_files.items():
            atomic_write(self.staging / name, lambda p, t=text: p.write_text(t))
        shutil.rmtree(self.resume_dir)
        manifest["size"] = {
            "weights_bytes": weight_bytes,
            "folder_bytes": sum(f.stat().st_size for f in self.staging.iterdir() if f.is_file()),
        }
        manifest["checksum"] = folder_checksum(self.staging)
        manifest.setdefault("seconds", {})["write"] = round(
            manifest["seconds"].get("write", 0.0) + time.perf_counter() - started, 3)
        manifest["peak_rss_mb"] = round(peak_rss_mb(), 1)
        atomic_write(self.staging / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=2) + "\n"))
        self._rename_into_place()
        return weight_bytes

    def _regroup(self, records: dict[str, LinearState], blocks: set[str]) -> int:
        """Block files + outside tensors -> shards of at most SHARD_BYTES, in model order; the zero
        points of `blocks` (compressor.pack.block_layers) unpacked on the way."""
        parts = sorted(self.staging.glob("block-*.safetensors")) + [self.staging / "outside.safetensors"]
        readers = [(part, SafetensorsReader.of_file(part)) for part in parts]
        groups: list[list[tuple[Path, SafetensorsReader]]] = [[]]
        size = 0
        for part, reader in readers:
            nbytes = part.stat().st_size
            if groups[-1] and size + nbytes > SHARD_BYTES:
                groups.append([])
                size = 0
            groups[-1].append((part, reader))
            size += nbytes
        names = ([WEIGHTS_NAME] if len(groups) == 1 else
                 [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
        weight_map, total = {}, 0
        for name, group in zip(names, groups, strict=True):
            tensors = {key: reader.read(key) for _, reader in group for key in sorted(reader.keys())}
            unpack_block_zero_points(tensors, records, blocks)
            atomic_write(self.staging / name, lambda p, t=tensors: save_file(t, p, metadata={"format": "pt"}))
            weight_map.update({key: name for key in tensors})
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            del tensors
            for part, _ in group:
                part.unlink()
        if len(groups) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.staging / INDEX_NAME).write_text(json.dumps(index, indent=2))
        return sum(f.stat().st_size for f in self.staging.glob("*.safetensors"))

    def _rename_into_place(self) -> None:
        umask = os.umask(0)
        os.umask(umask)
        for path in self.staging.iterdir():  # safetensors creates its files owner-only
            path.chmod(0o666 & ~umask)
        if self.output.exists():
            trash = self.output.with_name(f".{self.output.name}.old-{os.getpid()}")
            self.output.rename(trash)
            self.staging.rename(self.output)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            self.staging.rename(self.output)

    def discard(self) -> None:
        """A failed run leaves nothing behind (an interrupted one keeps its staging for --resume)."""
        if self.writes:
            shutil.rmtree(self.staging, ignore_errors=True)


def save_config(model, tokenizer, records: dict[str, LinearState], ignore: list[str], folder: Path,
                target: Target | str = Target.ANY) -> None:
    """config.json with the quantization_config, generation config and tokenizer files."""
    config = model.config
    previous = getattr(config, "quantization_config", None)
    qconfig = quantization_config(records, ignore, target)
    try:
        if qconfig is not None:
            config.quantization_config = qconfig
        config.save_pretrained(folder)
        if qconfig is not None and qconfig.get("quant_method") in OWN_QUANT_METHODS:
            guard_config(Path(folder))
    finally:
        if previous is None:
            config.__dict__.pop("quantization_config", None)
        else:
            config.quantization_config = previous
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def folder_checksum(folder: Path) -> dict:
    """SHA-256 of every file (compress.json aside) and one digest over them all: two runs with the
    same inputs and seed give the same digest."""
    files = {}
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file() and p.name != MANIFEST):
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(2**20), b""):
                digest.update(chunk)
        files[path.name] = digest.hexdigest()
    combined = hashlib.sha256("".join(f"{n}:{h}\n" for n, h in files.items()).encode()).hexdigest()
    return {"sha256": combined, "files": files}


def save_checkpoint(model, tokenizer, records: dict[str, LinearState], folder: Path,
                    ignore: list[str], target: Target | str = Target.ANY) -> int:
    """A model in memory written whole into an existing folder, as one file (tests, small tools)."""
    tensors = unpack_block_zero_points(module_tensors(model, "", records), records,
                                       block_layers(records, target))
    save_file(tensors, Path(folder) / WEIGHTS_NAME, metadata={"format": "pt"})
    save_config(model, tokenizer, records, ignore, Path(folder), target)
    return (Path(folder) / WEIGHTS_NAME).stat().st_size
