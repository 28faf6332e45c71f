"""The deep-FL benchmark script runs end to end at a tiny size and writes its tables."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

# The benchmark's smoke runs are subprocesses that train networks: slow tier.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(args, out):
    """Run ``benchmarks/deep_fl.py`` with ``args`` writing to ``out``; returns its JSON."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "deep_fl.py"), *args, "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads((out / "results.json").read_text())


def test_deep_fl_benchmark_smoke(tmp_path):
    out = tmp_path / "bench"
    args = [
        "--clients", "4", "--new-clients", "1", "--global-test", "100", "--rounds", "3",
        "--fraction", "0.5", "--hidden", "8", "--seeds", "0", "--alpha", "0.5",
        "--local-only-epochs", "1", "--finetune-epochs", "1",
        "--methods", "local", "fedavg", "fedhb:family=diag,eps=0.05",
        "--cost-clients", "3", "--cost-examples", "8", "--cost-rounds", "1",
    ]  # fmt: skip
    data = run_benchmark(args, out)
    table = (out / "results.md").read_text()
    assert "| fedhb:family=diag,eps=0.05 |" in table and "## Cost" in table
    runs = data["results"]["0.5"]
    assert set(runs) == {"local", "fedavg", "fedhb:family=diag,eps=0.05"}
    assert 0.0 <= runs["fedavg"][0]["global_acc"] <= 1.0
    assert data["cost"][0]["clients"] == 3
    assert data["settings"]["versions"]["torch"] == __import__("torch").__version__


def test_deep_fl_benchmark_mixture_smoke(tmp_path):
    """Rotated clusters with the cluster-started mixture: the run reports the rotation
    purity of its components (a share of clients, so in [1/K, 1]) and the uniform fallback."""
    args = [
        "--scheme", "iid", "--rotations", "2", "--clients", "8", "--new-clients", "2",
        "--global-test", "100", "--rounds", "4", "--fraction", "0.5", "--hidden", "8",
        "--seeds", "0", "--finetune-epochs", "1",
        "--methods", "mixture:cluster=2,hold=2", "--cost-clients",
    ]  # fmt: skip
    run = run_benchmark(args, tmp_path / "rotated")["results"]["None"]
    (result,) = run["mixture:cluster=2,hold=2"]
    assert 0.5 <= result["cluster_purity"] <= 1.0
    assert 0.0 <= result["global_uniform_acc"] <= 1.0
