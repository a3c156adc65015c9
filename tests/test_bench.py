"""The benchmark's CPU path, so CI keeps it working (figures come from GPU runs: docs/benchmarks.md)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cpu_benchmark_measures_all_three_and_the_ratio(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"))
    proc = subprocess.run(
        [sys.executable, "bench/throughput.py", "--small", "--json", str(out), "--model-seconds", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    row = result["models"]["test_resnet.r160_in1k"]
    assert row["errors"] == []
    assert row["model_only"]["images_per_second"] > 0
    assert row["dali_only"]["images"] == 32  # 2 shards x 16 photos, every one decoded
    assert row["full_flow"]["images"] == 32
    limit = min(row["model_only"]["images_per_second"], row["dali_only"]["images_per_second"])
    assert row["ratio"] == round(row["full_flow"]["images_per_second"] / limit, 3)
    # The CPU path's embeddings equal timm's own preprocessing + model.
    assert result["fidelity"]["min_cosine"] > 0.9999
