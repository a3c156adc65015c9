"""The `embed-shards` flow object called directly (`embed_flow(config)` in a script, as a subflow of a flow of the
user's, with a task runner of the user's), not through flows.embed.run: the same setup around it as run() gives."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import flows.embed  # Prefect's logging set up now, not under a test's captured stderr, closed after it
from conftest import TINY_MODEL
from wdsembed.config import EmbedConfig
from wdsembed.inputs import InputError

SETTINGS = dict(model_name=TINY_MODEL, pretrained=False, device="cpu", batch_size=4, num_threads_per_worker=1,
                n_workers=1, fidelity_sample=0)


def _config(data: Path, out: Path, **kw) -> EmbedConfig:
    return EmbedConfig(**({"input": str(data), "output": str(out)} | SETTINGS | kw))


@pytest.mark.slow
def test_the_flow_called_directly_keeps_the_decoders_lines_off_stderr(tmp_path, capfd, prefect_api):
    """embed_flow(config) printed libpng's and nvImageCodec's lines for every bad image on the caller's stderr
    (twice per image), which run() sends to the log; as a subflow of the user's own flow too."""
    from prefect import flow

    from wdsembed.synthetic import write_demo_dataset

    write_demo_dataset(tmp_path / "in", n_shards=1, per_shard=6, corrupt_per_shard=2)  # a cut JPEG, a damaged PNG

    @flow
    def users_flow(config: EmbedConfig):
        return flows.embed.embed_flow(config)

    for out, call in (("direct", flows.embed.embed_flow), ("subflow", users_flow)):
        manifest = call(_config(tmp_path / "in", tmp_path / out))
        assert any("damaged PNG" in c["reason"] for c in manifest["rows_without_embedding"]["causes"]), manifest
        err = capfd.readouterr().err
        assert "libpng" not in err and "[ERROR]" not in err, (out, err[-3000:])


@pytest.mark.slow
def test_the_flow_called_directly_refuses_a_missing_input_in_one_line_before_its_claim(tmp_path, caplog,
                                                                                        prefect_api):
    """run() refuses a missing input before it claims OUTPUT, in one line. Called directly, the flow failed in its
    index-shards task run, after it had taken the claim, its log lines carrying Prefect's traceback through the
    planning."""
    config = _config(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(InputError, match="missing does not exist"):
        flows.embed.embed_flow(config=json.loads(config.model_dump_json()))  # as a deployment passes it
    ends = [r for r in caplog.records if "missing does not exist" in r.getMessage()]
    assert ends and all(r.exc_info is None for r in ends), [(r.name, r.getMessage()) for r in ends]
    assert not [r for r in caplog.records if getattr(r, "task_name", None) == "index-shards"]  # no planning
    assert not (tmp_path / "out").exists()  # refused before its claim


@pytest.mark.slow
def test_the_flow_with_a_users_dask_runner_starts_no_cluster_where_every_output_is_finished(tmp_path, caplog,
                                                                                             prefect_api):
    """run() starts no Dask cluster for a re-run with nothing to compute. embed_flow run with a DaskTaskRunner of
    the user's started its local cluster for it (seconds of start and stop) to hand the cached task runs to."""
    from prefect_dask import DaskTaskRunner

    from wdsembed.synthetic import write_demo_dataset

    write_demo_dataset(tmp_path / "in", n_shards=2, per_shard=2)
    config = _config(tmp_path / "in", tmp_path / "out")
    first = flows.embed.embed_flow(config)  # computed in this process's threads (the flow's own task runner)
    assert first["totals"]["computed"] == 2
    # the config's n_workers went unused without a word: said now
    assert [r for r in caplog.records if r.levelname == "WARNING" and "n_workers=1 not used" in r.getMessage()]
    caplog.clear()
    runner = DaskTaskRunner(cluster_kwargs={"n_workers": 1, "threads_per_worker": 1, "processes": False})
    again = flows.embed.embed_flow.with_options(task_runner=runner)(config)
    assert again["totals"]["cached"] == 2 and again["totals"]["computed"] == 0, again["totals"]
    assert not [r for r in caplog.records if "Creating a new Dask cluster" in r.getMessage()]
