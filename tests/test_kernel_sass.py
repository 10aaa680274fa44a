"""scripts/kernel_sass.py: the decode kernel compiled for sm_90 on a machine without a GPU, its loops counted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RECORD = REPO / "results" / "bench" / "sweeps-2026-12-02b" / "kernel_sass.json"
pytestmark = pytest.mark.bench  # instruction counts of compiled kernels, not a check of the harness


def test_offline_sass_counts_keep_the_word_major_unpack_lean(tmp_path):
    # A process of its own: the tests run Triton in the interpreter, and compiling needs the real JIT.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(REPO / "scripts" / "kernel_sass.py"), "--methods", "kivi-2",
           "--configs", "default,lean", "--out", str(tmp_path)]
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, text=True, timeout=600)
    rows = {r["config"]: r for r in json.loads((tmp_path / "kernel_sass.json").read_text())}
    for row in rows.values():
        assert "Used" in row["resources"] and "0 bytes spill stores" in row["resources"]
        hot = next(lp for lp in row["loops"] if lp["start"] == row["hot_loop"])
        ops = dict(hot["ops"])
        assert ops.get("HMMA", 0) > 0 and ops.get("LDG", 0) > 0  # the tile loop: loads and tensor-core dots
        assert row["issue_floor_us"] > 0
    # The broadcast unpack (dropped: results/bench/sweeps-2026-12-02b/broadcast_unpack_experiment.patch) converted
    # each thread's copies of scales and zeros and moved words through shared memory: 899 instructions per warp and
    # tile in the record, 593 for the word-major one. Its lean whole-tile kernel fit 128 registers.
    broadcast = next(r for r in json.loads(RECORD.read_text())
                     if (r["method"], r["config"]) == ("kivi-2", "broadcast-unpack"))
    assert rows["default"]["hot_instructions"] < 0.8 * broadcast["hot_instructions"]
    assert "Used 128 registers" in rows["lean"]["resources"]
