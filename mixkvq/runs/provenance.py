"""What produced a number: code revision, package versions, device, host, time, and the model weights and problems
that went in. Stored in every run row."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import socket
import subprocess
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# What changes tokens or grades: the model stack, the problem sources (reasoning-gym generates GSM-Symbolic), the
# graders; the last is this project.
PACKAGES = ("torch", "transformers", "triton", "datasets", "reasoning-gym", "math-verify", "mixkvq-harness")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(package: str) -> str | None:
    # Metadata, not import: importing torch or triton here would be slow and may touch the GPU.
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_name(device=None) -> str:
    """GPU name for a CUDA device (None: the current one if CUDA is available), else the CPU's."""
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        dev = torch.device(device) if device is not None else None
        if (dev is None and torch.cuda.is_available()) or (dev is not None and dev.type == "cuda"):
            return torch.cuda.get_device_name(dev)
        if dev is not None and dev.type != "cpu":
            return dev.type
    return platform.processor() or "cpu"


def collect(device=None) -> dict:
    sha = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain") if sha is not None else None
    versions = {"python": platform.python_version(), **{p: _version(p) for p in PACKAGES}}
    return {
        "git_sha": sha,
        "git_dirty": None if status is None else bool(status),
        "versions": json.dumps(versions, sort_keys=True),
        "device": device_name(device),
        "hostname": socket.gethostname(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def problems_sha256(problems) -> str:
    """Content hash of the problems a run asked (ids, questions, gold answers, in order): the data's identity
    whether it came from the hub, a local file or a generator."""
    rows = [[p.id, p.question, p.answer] for p in problems]
    return text_sha256(json.dumps(rows, ensure_ascii=False, separators=(",", ":")))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_weights_sha256(folder: str | Path) -> str | None:
    """One sha256 over the weight files of a local model folder (name and content of each, sorted), or None
    when it holds none. Reads every byte: about a second per GB."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        return None
    return text_sha256(json.dumps([[p.name, file_sha256(p)] for p in files]))
