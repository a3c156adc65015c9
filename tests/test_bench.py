"""The benchmark's CPU path, so CI keeps it working (figures come from GPU runs: docs/benchmarks.md)."""
import json
import os
import re
import subprocess
import sys

from conftest import TINY_MODEL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cpu_benchmark_measures_all_three_the_ratio_and_scaling(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"))
    proc = subprocess.run(
        [sys.executable, "bench/throughput.py", "--small", "--json", str(out), "--model-seconds", "1", "--gpus", "1", "2"],
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
    # Scaling runs on one and two worker processes: every shard done once, outputs equal to the one-worker run's.
    one, two = result["scaling"]["1"], result["scaling"]["2"]
    assert one["images"] == two["images"] == 32
    assert two["outputs_vs_first"]["shards"] == 2 and two["outputs_vs_first"]["rows"] == 32
    assert two["outputs_vs_first"]["identical"], two["outputs_vs_first"]
    # The CPU path's embeddings equal timm's own preprocessing + model.
    assert result["fidelity"]["min_cosine"] > 0.9999
    assert result["cuda_mps"] is False  # no MPS pipe named: the processes took turns on any GPU


def test_layers_run_the_flow_and_the_api_in_turn_each_counting_its_own_images(tmp_path):
    out = tmp_path / "bench.json"
    # An MPS pipe named, as `bench/device.sh mps` names it: the JSON says the run was under MPS (on the CPU path
    # the variable changes nothing else).
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"), CUDA_MPS_PIPE_DIRECTORY=str(tmp_path / "mps"))
    proc = subprocess.run(
        [sys.executable, "bench/throughput.py", "--small", "--json", str(out), "--skip", "model", "dali", "fidelity",
         "--layers", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["cuda_mps"] is True
    row = result["models"]["test_resnet.r160_in1k"]
    flow, api = row["full_flow"], row["api_no_prefect"]
    assert flow["images"] == api["images"] == 32
    assert flow["orchestration_seconds"]["submit"] >= 0 and "orchestration_seconds" not in api  # only the flow's
    # The bench process's own collections during each run (the flow and Dask's scheduler run there), each full one
    # with when it began within the run.
    collected = flow["flow_process_gc"]
    assert len(collected["collections"]) == 3 and len(collected["full_at_s"]) == collected["collections"][2]
    assert all(0 <= at <= flow["wall_seconds"] + 1 and took >= 0 for at, took in collected["full_at_s"])
    # No GPU here: no device memory to split or sample, and the JSON says so rather than inventing a figure.
    assert flow["gpu_memory_split"] is None and flow["sampled_gpu_memory_gib"] is None
    assert flow["peak_gpu_memory_gib"] == 0.0 and flow["peak_host_rss_gib"] > 0
    # CPU workers are left DALI's defaults: the allocator set for GPU workers (worker.set_gpu_process_environment)
    # is not theirs.
    assert flow["dali_memory_env"] == dict.fromkeys(("DALI_USE_CUDA_MALLOC_ASYNC", "DALI_USE_VMM",
                                                     "DALI_USE_DEVICE_MEM_POOL"))
    assert flow["worker_gpu_env"] == dict.fromkeys(("CUDA_DEVICE_MAX_CONNECTIONS", "PYTORCH_CUDA_ALLOC_CONF"))


def test_a_worker_setting_read_at_build_time_is_really_switched_between_runs(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"))
    env.pop("WDSEMBED_COPY_INPUTS", None)
    proc = subprocess.run(
        [sys.executable, "bench/throughput.py", "--small", "--json", str(out), "--skip", "model", "dali", "fidelity",
         "--worker-env", "1", "WDSEMBED_COPY_INPUTS", "0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    row = json.loads(out.read_text())["models"]["test_resnet.r160_in1k"]
    default, changed = row["full_flow"], row["full_flow_env_set"]
    assert default["images"] == changed["images"] == 32
    # The workers' Worker is built once and kept: each run must have run with its own setting, not the warm-up's.
    assert [w["WDSEMBED_COPY_INPUTS"] for w in default["worker_built_with"]] == [None]
    assert [w["WDSEMBED_COPY_INPUTS"] for w in changed["worker_built_with"]] == ["0"]


def test_output_comparison_sees_one_changed_embedding(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    sys.path.insert(0, ROOT)
    from bench.throughput import compare_outputs

    def write(folder, first):
        folder.mkdir()
        table = pa.table({"key": ["a", "b"], "image_embedding": [first, [0.0, 1.0]], "embedding_error": [None, None]})
        pq.write_table(table, folder / "00000.parquet")

    write(tmp_path / "x", [1.0, 0.0])
    write(tmp_path / "y", [1.0, 0.0])
    write(tmp_path / "z", [1.0, 0.25])
    assert compare_outputs(str(tmp_path / "x"), str(tmp_path / "y"))["identical"]
    changed = compare_outputs(str(tmp_path / "x"), str(tmp_path / "z"))
    assert not changed["identical"] and changed["max_abs_embedding_difference"] == 0.25


def test_shards_built_with_the_same_arguments_are_kept_and_others_replace_them_whole(tmp_path):
    sys.path.insert(0, ROOT)
    from bench.throughput import build_shards

    folder = tmp_path / "shards"
    assert build_shards(str(folder), 3, 4, unique=4) == 12
    first = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert {"00000.tar", "00002.tar", "00002.idx"} <= first.keys()
    assert build_shards(str(folder), 3, 4, unique=4) == 12
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == first  # nothing written again
    build_shards(str(folder), 2, 4, unique=4)  # fewer shards: the third does not linger as input
    assert sorted(p.name for p in folder.glob("*.tar")) == ["00000.tar", "00001.tar"]


def test_idle_time_counts_the_gaps_no_shard_covers():
    """A worker's stream starts the next shard while the previous one's last batches finish: the spans overlap,
    and only time that no span covers is idle (a span inside another hides no gap)."""
    sys.path.insert(0, ROOT)
    from bench.throughput import embedding_spans, idle_fraction, merged

    assert merged([(5, 6), (0, 10), (1, 2), (12, 13), (12.5, 14)]) == [(0, 10), (12, 14)]
    shard = lambda w, a, b: {"embedded": 100, "timeline": {"worker": w, "embed_start": a, "embed_end": b}}  # noqa: E731
    manifest = {"shards": {"a": shard("w1", 0, 10), "b": shard("w1", 1, 2), "c": shard("w1", 5, 6),
                           "d": shard("w1", 12, 14), "e": shard("w2", 0, 4)}}
    # w1: covered 0-10 and 12-14 (2 s idle of 14); w2: 4 s, no gap
    assert idle_fraction(manifest) == round(2 / 18, 4)
    # images over covered seconds: w1 400 / 12, w2 100 / 4
    assert embedding_spans(manifest, wall=20.0)["in_shard_images_per_second"] == round(400 / 12 + 100 / 4, 1)
    # Where each task's body ran (process_shard's start and end), the orchestration's share of the fixed time: the
    # run started at -3, its first task body at -1 (2 s before it), the last body ended at 15, the run at 17.
    for stem, (a, b) in {"a": (-1, 11), "b": (0, 3), "c": (4, 7), "d": (11, 15), "e": (-0.5, 5)}.items():
        manifest["shards"][stem]["timeline"].update(start=a, end=b)
    spans = embedding_spans(manifest, wall=20.0, started=-3.0)
    assert (spans["seconds_before_embedding"], spans["seconds_after_embedding"]) == (3.0, 3.0)
    assert (spans["seconds_before_first_task"], spans["seconds_after_last_task"]) == (2.0, 2.0)


def test_a_gpu_shared_by_two_workers_is_idle_only_while_neither_streams():
    """With two worker processes on one GPU (EmbedConfig.workers_per_gpu), one worker's gap between shards is not
    the GPU's when the other streams through it."""
    sys.path.insert(0, ROOT)
    from bench.throughput import idle_fraction

    shard = lambda w, a, b: {"timeline": {"worker": w, "embed_start": a, "embed_end": b}}  # noqa: E731
    # w1 streams 0-4 and 6-10, w2 3-7: each worker alone has a gap, the GPU has none; w3 on GPU 1 has 2 s of 10.
    manifest = {"shards": {"a": shard("w1", 0, 4), "b": shard("w1", 6, 10), "c": shard("w2", 3, 7),
                           "d": shard("w3", 0, 4), "e": shard("w3", 6, 10)}}
    assert idle_fraction(manifest) == round((2 + 0 + 2) / (10 + 4 + 10), 4)  # per worker, as if each had a GPU
    assert idle_fraction(manifest, {"w1": "0", "w2": "0", "w3": "1"}) == round(2 / 20, 4)


def test_the_flow_runs_on_clusters_of_each_size_given_each_with_its_own_workers(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"))
    proc = subprocess.run(
        [sys.executable, "bench/throughput.py", "--small", "--json", str(out), "--skip", "dali", "fidelity",
         "--model-seconds", "0.5", "--workers-per-gpu", "1", "2", "--repeats", "2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # The size is the bench's own cluster's; its runs go to that cluster by address, where the field does nothing:
    # the flow would say so about a setting the bench never meant for it.
    said = proc.stdout + proc.stderr
    assert "is for a local cluster on GPUs" not in said, said[-3000:]
    row = json.loads(out.read_text())["models"]["test_resnet.r160_in1k"]
    by = row["by_workers_per_gpu"]
    assert sorted(by) == ["1", "2"]
    assert [by[n]["worker_processes"] for n in ("1", "2")] == [1, 2]
    for n, flow in by.items():
        assert flow["images"] == 32 and len(flow["runs"]) == 2  # each run embedded every image, timed twice
        assert 1 <= flow["workers_that_embedded"] <= flow["worker_processes"]
        fastest = max(row["fastest_model_only"]["images_per_second"], row["model_only"]["images_per_second"])
        assert flow["ratio_to_fastest"] == round(flow["images_per_second"] / fastest, 3)
    assert row["full_flow"]["worker_processes"] == 1  # the row's own (c) is the first size's


def test_first_task_bench_times_each_way_of_submitting(tmp_path):
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"))
    env.pop("PREFECT_API_URL", None)  # the bench starts its own server for itself and its worker
    proc = subprocess.run([sys.executable, "bench/first_task.py", "--tasks", "4", "--seconds", "0.05", "--repeats", "1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if "task(s)" in line]
    assert [line.split("  ")[0] for line in lines] == ["1 task(s)", "3 task(s)", "4 task(s)",
                                                       "4 task(s), the first alone"]
    for line in lines:  # seconds from the flow body's start: each task's body after it, the first before the last
        first, last = (float(re.search(rf"{name} ([0-9.]+) s", line).group(1)) for name in ("first", "last"))
        assert 0 < first <= last


def test_gpu_share_times_one_process_and_several_over_the_same_images(tmp_path):
    out = tmp_path / "share.json"
    proc = subprocess.run([sys.executable, "bench/gpu_share.py", "--model", TINY_MODEL, "--processes", "2",
                           "--passes", "2", "--images", "48", "--batch-size", "8", "--threads", "1",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["cuda_mps"] is False  # run without `bench/device.sh mps`
    (run,) = result["runs"]
    # every process embedded all 48 images in every pass (the script refuses otherwise), timed alone and together
    assert run["images_per_pass"] == 48 and run["processes"] == 2
    assert len(run["one_process"]) == len(run["all_processes"]) == 2
    assert all(rate > 0 for rate in run["one_process"] + run["all_processes"]) and run["ratio_of_medians"] > 0


def test_geometry_probe_times_each_variant_fed_alone_and_behind_the_reader_thread():
    """`dali_probe.py --geometry-only` (issue #11's CPU measurement) runs every quick variant, the ones behind the
    flow's reader thread included, and prints the ratios the issue names."""
    variants = ["E", "B", "Bs", "rsz", "ops", "Ar", "Br"]
    proc = subprocess.run([sys.executable, "bench/dali_probe.py", "--geometry-only", "--images", "2048", "--repeats",
                           "1", "--threads", "1", "--only", *variants], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rates = {m.group(1): float(m.group(2).replace(",", ""))
             for m in re.finditer(r"^(\w+)\s+([0-9,]+)\s+[0-9,]+\s", proc.stdout, re.MULTILINE)}
    assert set(rates) == {"A", *variants} and all(rate > 0 for rate in rates.values()), proc.stdout
    medians = next(line for line in proc.stdout.splitlines() if line.startswith("medians:"))
    for name, base in (("B", "A"), ("Bs", "A"), ("Ar", "A"), ("Br", "Ar")):
        ratio = float(re.search(rf"\b{name} / {base} = ([0-9.]+)", medians).group(1))
        assert abs(ratio - rates[name] / rates[base]) < 0.006  # printed to two places, from unrounded rates


def test_the_cpu_baseline_bench_runs_the_tool_and_the_plain_loop_on_the_same_images(tmp_path):
    out = tmp_path / "baseline.json"
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"))
    proc = subprocess.run(
        [sys.executable, "bench/cpu_baseline.py", "--model", TINY_MODEL, "--images", "256", "--rounds", "1",
         "--batch-sizes", "64", "--workdir", str(tmp_path / "work"), "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rounds = result["batch_sizes"]["64"]["rounds"]
    assert [r["images"] for r in rounds["tool"]] == [r["images"] for r in rounds["baseline"]] == [256]
    for key in ("run_rate", "wall_rate"):
        summary = result["batch_sizes"]["64"]["summary"][key]
        assert summary["baseline"] > 0 and summary["tool"]["images_per_second"] > 0
        assert summary["tool"]["over_baseline_paired"] > 0
