"""What produced a number: code revision, package versions, device, host, time. Stored in every run row."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import socket
import subprocess
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("torch", "transformers", "triton", "mixkvq-harness")  # the last is this project


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
