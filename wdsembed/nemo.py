"""NeMo Curator's entry points for image embedding, so that its users' code runs with only its imports changed:

    from wdsembed import get_client, ImageTextPairDataset, TimmImageEmbedder

    client = get_client(cluster_type="gpu")
    dataset = ImageTextPairDataset.from_webdataset(path="/path/to/dataset", id_col="key")
    embedding_model = TimmImageEmbedder("vit_large_patch14_clip_quickgelu_224.openai", pretrained=True,
                                        batch_size=1024, num_threads_per_worker=16, normalize_embeddings=True)
    dataset_with_embeddings = embedding_model(dataset)
    dataset_with_embeddings.save_metadata()

Where it differs (docs/nemo.md): the embeddings are computed when the embedder is called, into
`<path>_embeddings/<shard>.parquet` (or `embedding_model(dataset, output)`), never over the dataset's own parquet
files; `save_metadata()` with no path leaves them there, and with a path copies them (or the columns asked for).
"""
from __future__ import annotations

import glob
import importlib.util
import logging
import os
import posixpath
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Sequence

from wdsembed import shards, storage
from wdsembed.cluster import SHARDS_PER_GPU, refuse_in_a_worker_bootstrap
from wdsembed.config import refuse_credentials_in_url, speaking_to

log = logging.getLogger("wdsembed")

# NeMo Curator's get_client options that set up RAPIDS memory and cuDF for its own GPU dataframes; nothing here
# uses cuDF or RMM, so they are accepted and left out.
_CUDF_RMM_ONLY = ("nvlink_only", "enable_spilling", "set_torch_to_use_rmm")
# Options of a GPU cluster (dask_cuda.LocalCUDACluster) that a CPU cluster does not take.
_GPU_CLUSTER_ONLY = ("protocol", "rmm_pool_size", "rmm_async", "rmm_maximum_pool_size", "rmm_managed_memory",
                     "rmm_release_threshold")


def get_client(
    cluster_type: str = "cpu",
    scheduler_address: Optional[str] = None,
    scheduler_file: Optional[str] = None,
    n_workers: Optional[int] = None,
    threads_per_worker: Optional[int] = None,
    workers_per_gpu: int = 1,
    **cluster_kwargs: Any,
):
    """A `distributed.Client`, made current: to an existing scheduler (`scheduler_address` or `scheduler_file`),
    else to a cluster started on this machine:

    * "gpu": one worker per visible GPU (dask_cuda.LocalCUDACluster; `n_workers` GPUs if given), each declaring the
      resource GPU=1; a shard task takes a third of it (cluster.GPU_SHARE_PER_SHARD), so a worker holds three
      shards, one in its pipeline at a time. `workers_per_gpu` worker processes on each GPU where more than one
      (EmbedConfig.workers_per_gpu says when that pays). Where no GPU is visible, or dask-cuda is not installed, a
      CPU cluster instead (with a warning in the log).
    * "cpu": `n_workers` worker processes (default 2, or 1 where this process may use one core: each loads the
      model) splitting the cores between them.

    Other keyword arguments go to the cluster class. In a script, start it under `if __name__ == "__main__":`
    (worker processes import the script again; this holds for any Dask local cluster)."""
    from distributed import Client, LocalCluster

    if cluster_type not in ("cpu", "gpu"):
        raise ValueError(f"cluster_type must be 'cpu' or 'gpu', not {cluster_type!r}")
    if scheduler_address and scheduler_file:
        raise ValueError("give scheduler_address or scheduler_file, not both")
    if scheduler_address or scheduler_file:
        return Client(address=scheduler_address, scheduler_file=scheduler_file, timeout="30s")
    refuse_in_a_worker_bootstrap("get_client()")
    for name in _CUDF_RMM_ONLY:
        cluster_kwargs.pop(name, None)
    if cluster_type == "gpu":
        reason = _why_no_gpu_cluster()
        if reason is None:
            from wdsembed.cluster import start_gpu_cluster, visible_gpus

            # As the flow's runner starts it: SHARDS_PER_GPU threads, so that a shard's reading and writing overlap
            # another's time in the GPU pipeline (each shard task asks for a share of the GPU resource).
            options = {"threads_per_worker": threads_per_worker or SHARDS_PER_GPU} | cluster_kwargs
            return Client(start_gpu_cluster(n_workers or visible_gpus(), workers_per_gpu, **options))
        log.warning("get_client(cluster_type='gpu'): %s; starting a CPU cluster instead", reason)
    for name in _GPU_CLUSTER_ONLY:
        cluster_kwargs.pop(name, None)
    from wdsembed.cluster import cpu_worker_env, default_cpu_workers, local_nanny

    n_workers = n_workers or default_cpu_workers()
    options = {
        "n_workers": n_workers,
        "threads_per_worker": threads_per_worker or 1,
        "processes": True,
        # torch's thread pools share the cores instead of each taking all of them
        "env": cpu_worker_env(n_workers),
    } | cluster_kwargs
    if options["processes"]:  # worker processes that leave Ctrl-C to this one (wdsembed.localworkers)
        options.setdefault("worker_class", local_nanny())
    elif "env" not in cluster_kwargs:  # threads of this process, whose environment is the caller's: Worker refuses env
        del options["env"]
    return Client(LocalCluster(**options))


def _why_no_gpu_cluster() -> Optional[str]:
    from wdsembed.cluster import visible_gpus

    if not visible_gpus():
        return "no GPU is visible"
    if importlib.util.find_spec("dask_cuda") is None:
        return "dask-cuda is not installed (pip install 'wdsembed[gpu]')"
    return None


@dataclass
class ImageTextPairDataset:
    """WebDataset shards (`<path>/*.tar`) with their per-shard metadata (`<stem>.parquet`, one row per sample,
    keyed by `id_col`): the dataset's own img2dataset parquets, or after embedding, the embedded copies.

    `path`: the shards' folder or URL. `tar_files`: the shards. `metadata_path`: the folder of the metadata
    parquets (the dataset's own folder until it is embedded). `results`: after embedding, one ShardResult per
    shard."""

    path: str
    tar_files: list[str]
    id_col: str = "key"
    storage_options: dict = field(default_factory=dict)
    metadata_path: Optional[str] = None
    results: list = field(default_factory=list, repr=False)
    # `metadata` as the caller left it, and the name of its Dask graph as read (see the property)
    _metadata: Any = field(default=None, init=False, repr=False, compare=False)
    _metadata_read_as: Optional[str] = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _refuse_credentials(path=self.path, metadata_path=self.metadata_path, storage_options=self.storage_options)

    def __repr__(self) -> str:
        # The shards by their count: a notebook cell ending in the dataset printed every tar's path (10,000 of them).
        options = f", storage_options={self.storage_options!r}" if self.storage_options else ""
        return (f"ImageTextPairDataset(path={self.path!r}, tar_files=<{len(self.tar_files)} shards>, "
                f"id_col={self.id_col!r}{options}, metadata_path={self.metadata_path!r})")

    @classmethod
    def from_webdataset(cls, path: str | os.PathLike, id_col: str = "key", storage_options: Optional[dict] = None):
        """The dataset of the shards in `path` (a folder or fsspec URL); `id_col` names the sample key column."""
        _refuse_credentials(path=path, storage_options=storage_options)
        options = dict(storage_options or {})
        path = os.fspath(path).rstrip("/") or "/"
        fs, root = storage.filesystem(path, options)
        from wdsembed.shards import list_shards

        try:
            tars = [storage.to_url(fs, t) for t in list_shards(root, fs)]
        except Exception:
            # why it cannot be listed, in one line naming it, as the command says; storage_options= in its advice
            with speaking_to("api", {"id_column": "id_col"}):
                storage.check_input(path, options)
            raise
        if not tars:
            raise ValueError(f"{path!r} holds no *.tar shards")
        return cls(path=path, tar_files=tars, id_col=id_col, storage_options=options, metadata_path=path)

    @property
    def stems(self) -> list[str]:
        return [os.path.basename(t)[: -len(".tar")] for t in self.tar_files]

    def metadata_files(self) -> list[str]:
        """The metadata parquet of every shard that has one: a file, or a folder of part files (Spark, Dask)."""
        return list(self._metadata_sources())

    def _metadata_sources(self) -> dict[str, bool]:
        """The URL of each shard's metadata parquet, in shard order, and whether it is a folder of part files; from
        one listing of the metadata folder (not one request per shard)."""
        if self.metadata_path is None:
            return {}
        fs, root = storage.filesystem(self.metadata_path, self.storage_options)
        try:
            entries = fs.ls(root, detail=True, refresh=True)  # refreshed: outputs written since an earlier listing
        except FileNotFoundError:  # no output yet
            return {}
        files, folders = set(storage.listed_files(fs, entries)), set(storage.listed_folders(entries))
        paths = [storage.join(root, f"{stem}.parquet") for stem in self.stems]
        return {storage.to_url(fs, p): p in folders for p in paths if p in files or p in folders}

    @property
    def metadata(self):
        """The metadata as a (lazy) dask DataFrame, one partition per shard; None where there is none.

        An attribute, as NeMo Curator's is: read once, then kept, so that a column set on it
        (`dataset.metadata["score"] = ...`) or a frame assigned to it (`dataset.metadata = ...`) stays the dataset's
        metadata, and save_metadata writes it."""
        if self._metadata is None:
            self._metadata = self._read_metadata()
            self._metadata_read_as = getattr(self._metadata, "_name", None)
        return self._metadata

    @metadata.setter
    def metadata(self, frame) -> None:
        self._metadata = frame

    def _edited_metadata(self):
        """The metadata where the caller changed it since it was read (a column set, rows filtered, another frame
        assigned: each gives it another Dask graph); else None."""
        frame = self._metadata
        if frame is None or getattr(frame, "_name", None) == self._metadata_read_as:
            return None
        return frame

    def _read_metadata(self):
        sources = self._metadata_sources()
        files = list(sources)
        if not files:
            return None
        import dask.dataframe as dd

        # Dask takes the columns from one file and fails to compute a partition that lacks any of them: the output
        # of a shard without an img2dataset parquet has only the key, embedding and error columns. Files of one
        # schema are read together, each run of them in shard order, and the runs concatenated: every column of
        # every shard, null where a shard has none.
        # The options as every other read here takes them: s3fs refuses region_name and the timeouts as given. The
        # read runs on Dask's workers, which may not import wdsembed (elsewhere: botocore's retries stay on there).
        options = storage.fsspec_options(files[0], self.storage_options, elsewhere=True) or None
        frames = []
        for run in self._runs_of_one_schema(files, folders={u for u, folder in sources.items() if folder}):
            if not sources[run[0]]:
                frames.append(_read_parquet(run, options))
                continue
            # A shard's parquet written as a folder of part files: Dask's read_parquet takes no folder among files,
            # and reads each part as a partition of its own; read as one partition, as one shard's.
            fs, path = storage.filesystem(run[0], self.storage_options)
            parts = self._runs_of_one_schema([storage.to_url(fs, p) for p in shards.parquet_parts(path, fs)])
            read = [_read_parquet(r, options) for r in parts]
            frames.append((read[0] if len(read) == 1 else dd.concat(read)).repartition(npartitions=1))
        return frames[0] if len(frames) == 1 else dd.concat(frames)

    def _runs_of_one_schema(self, files: list[str], folders: frozenset | set = frozenset()) -> list[list[str]]:
        """`files` in order, cut where a file's columns differ from the one before it (one footer read each). Each
        of `folders` (a parquet written as a folder of part files) is a run of its own."""
        schemas = [s.remove_metadata() for s in self._schemas(files)]
        runs: list[list[str]] = []
        for i, url in enumerate(files):
            if i and schemas[i] == schemas[i - 1] and url not in folders and files[i - 1] not in folders:
                runs[-1].append(url)
            else:
                runs.append([url])
        return runs

    def _schemas(self, files: list[str]) -> list:
        """The schema in the footer of each parquet of `files` (one footer read each, 16 at a time; a folder's,
        its parts' as one: shards.read_rows_schema). A Ctrl-C meanwhile ends it at once (threads.ContextThreadPool)."""
        from wdsembed.threads import ContextThreadPool

        def schema(url: str):
            fs, path = storage.filesystem(url, self.storage_options)
            return shards.read_rows_schema(path, fs)

        with ContextThreadPool(max(1, min(16, len(files)))) as pool:
            return list(pool.map(schema, files))

    def default_embeddings_path(self) -> str:
        """Where the embedder writes by default: the folder beside the dataset's, `<path>_embeddings`, named from
        the folder itself (for "." or "data/", from its absolute path: never a folder inside the dataset)."""
        fs, root = storage.filesystem(self.path, self.storage_options)
        root = os.path.abspath(root) if storage.is_local(fs) else root.rstrip("/")
        parent, name = posixpath.split(root)
        if not name or (not storage.is_local(fs) and not parent):
            raise ValueError(f"{self.path!r} has no parent folder to put {name}_embeddings in: "
                             "pass the output, embedding_model(dataset, output)")
        return storage.to_url(fs, posixpath.join(parent, name + "_embeddings"))

    def with_embeddings(self, metadata_path: str, results: Sequence,
                        tar_files: Optional[list[str]] = None) -> "ImageTextPairDataset":
        """The dataset with its embeddings in `metadata_path`. `tar_files`: the shards that were embedded, where the
        folder no longer holds those it was opened with (shards added or removed since): its metadata is theirs."""
        return replace(self, metadata_path=metadata_path, results=list(results),
                       tar_files=self.tar_files if tar_files is None else list(tar_files))

    def save_metadata(self, path: Optional[str | os.PathLike] = None, columns: Optional[list[str]] = None) -> str:
        """Write the metadata parquets (`<stem>.parquet`), with only `columns` if given, into `path`; returns it.
        The metadata as it stands: where it was changed since it was read (a column set on it, rows filtered), each
        shard's partition of it.

        Default `path`: where the metadata already is. For an embedded dataset that is its embeddings folder, so
        with no columns there is nothing to write, and metadata changed since is refused there: those files are the
        embedder's outputs, which the next run resumes from. Never the dataset's own folder nor one inside it: its
        parquets are img2dataset's (each sample's URL, caption, status), and the next run reads them as the shards'
        rows."""
        _refuse_credentials(**{"save_metadata(path)": path})
        target = os.fspath(path or self.metadata_path or self.path).rstrip("/")
        source = self.metadata_path
        if source is None:
            raise ValueError("this dataset has no metadata yet: embed it first, embedding_model(dataset)")
        edited = self._edited_metadata()
        # Places, not strings: "dataset", "./dataset" and its absolute path are one folder.
        where = storage.location(target, self.storage_options)
        in_place = where == storage.location(source, self.storage_options)
        already_there = in_place and columns is None and edited is None
        dataset = storage.location(self.path, self.storage_options)
        if storage.within(where, dataset) and not already_there:
            raise ValueError(f"save_metadata({target!r}) would write into the dataset's own folder {self.path!r} "
                             "(its parquets are the shards' img2dataset rows, read by every run): pass a folder "
                             f"outside it, e.g. save_metadata({self.default_embeddings_path()!r})")
        if already_there:
            # Rewriting them would strip their finished-shard keys: the next run would embed every shard again.
            log.info("metadata with embeddings is in %s", target)
            return target
        if in_place and edited is not None:
            raise ValueError(f"save_metadata({target!r}): the metadata was changed since it was read, and "
                             f"{target!r} holds the embedder's outputs, which the next run resumes from: pass "
                             "another folder, save_metadata(path)")
        self._copy_metadata(target, columns, edited)
        return target

    def _copy_metadata(self, target: str, columns: Optional[list[str]], edited) -> None:
        from wdsembed import output

        out_fs, out_root = storage.filesystem(target, self.storage_options)
        if storage.is_local(out_fs):
            out_fs.makedirs(out_root, exist_ok=True)
        for url, table in self._shard_tables(edited):
            if columns is not None:
                missing = [c for c in columns if c not in table.column_names]
                if missing:
                    raise KeyError(f"{url} has no column(s) {missing}; it has {table.column_names}")
                table = table.select(columns)
            # The footer no longer carries the finished-shard key: a saved copy, or a subset written in place, is
            # never taken for a finished output (a run into this folder recomputes it).
            schema_meta = {k: v for k, v in (table.schema.metadata or {}).items() if k != output.FOOTER_KEY}
            table = table.replace_schema_metadata(schema_meta)
            output.write_parquet_atomic(table, storage.join(out_root, posixpath.basename(url)), out_fs,
                                        metadata={"saved_from": url, "columns": columns})

    def _shard_tables(self, edited):
        """Each metadata file's URL and its rows: the file's, or where the metadata was changed in memory
        (`edited`), that shard's partition of it, in the file's column types. Either way with every column of the
        metadata, as it has them: a column a shard's file lacks (the output of a shard without an img2dataset
        parquet has only the key, embedding and error) is null there, in the type the first file holding it has,
        so that the saved files share one schema."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        sources = self._metadata_sources()
        files = list(sources)
        if edited is not None and edited.npartitions != len(files):
            raise ValueError(f"the metadata has {edited.npartitions} partitions, not one per shard's metadata file "
                             f"({len(files)}), so its rows cannot be written back shard by shard: write it with "
                             "dataset.metadata.to_parquet(path)")
        schemas = self._schemas(files)
        # In the metadata's column order: Dask's concat of the files' runs (_read_metadata) puts each column where
        # it first appears, in shard order.
        others: dict[str, pa.Field] = {}
        for schema in schemas:
            for f in schema:
                others.setdefault(f.name, f)
        for i, url in enumerate(files):
            schema = schemas[i]
            if edited is None:
                fs, src = storage.filesystem(url, self.storage_options)
                if sources[url]:  # a parquet written as a folder of part files: saved as one file
                    table = shards.read_rows(src, fs)
                else:
                    with fs.open(src, "rb") as f:
                        table = pq.read_table(f)
                yield url, _with_columns(table, others.values(), _pandas_index_columns(schemas))
                continue
            part = edited.get_partition(i).compute()
            # A named index is a column of the file (pandas' to_parquet, which Dask reads back as the index); so is
            # an unnamed one that pandas stored as `__index_level_0__` (a filtered frame's row labels). An index
            # Dask made for a file without one (a RangeIndex, or its filtered rows) is not written.
            named = any(name is not None for name in part.index.names)
            stored = any(isinstance(c, str) for c in (schema.pandas_metadata or {}).get("index_columns", ()))
            rows = pa.Table.from_pandas(part, preserve_index=named or stored)
            lacked = [others[name] for name in rows.column_names if name in others and name not in schema.names]
            yield url, _in_types_of(pa.schema(list(schema) + lacked, metadata=schema.metadata), rows)


def _pandas_index_columns(schemas) -> set[str]:
    """The columns that pandas stored a DataFrame's index in, in any of `schemas`: Dask reads them as the index, so
    they are no columns of the metadata."""
    return {c for s in schemas for c in (s.pandas_metadata or {}).get("index_columns", ()) if isinstance(c, str)}


def _with_columns(table, fields, skip: set[str]):
    """`table` with a column for each of `fields` (but `skip`), in their order: its own, or nulls of the field's
    type where it lacks one. Its own columns not among `fields` follow; its schema's metadata stays."""
    import pyarrow as pa

    own = set(table.column_names)
    order = [f for f in fields if f.name in own or f.name not in skip]
    order += [f for f in table.schema if f.name not in {g.name for g in order}]
    if [f.name for f in order] == table.column_names:
        return table
    columns = [table.column(f.name) if f.name in own else pa.nulls(table.num_rows, f.type) for f in order]
    schema = pa.schema([table.schema.field(f.name) if f.name in own else f for f in order],
                       metadata=table.schema.metadata)
    return pa.Table.from_arrays(columns, schema=schema)


def _read_parquet(urls: list[str], options: Optional[dict]):
    """Dask's read_parquet of the files `urls`, each read as named and as it holds, whatever its path's names:
    - Dask globs every path of a list that holds `*`, `?` or `[` (fsspec's expand_paths_if_needed), so a file or
      folder named so (`[1].parquet`, `photos [2024]/`) matched nothing, and its rows were left out without a
      word: escaped, the glob matches it alone;
    - Dask takes a folder named `name=value` in the path (`s3://b/version=2/shards_embeddings/`, and so
      `dt=2024-01-01/`, `d=1_embeddings/`) for a hive partition: a column of that name was added to every row,
      and one named as a column of the files (`status=new/`) failed the read. Without partitioning, neither."""
    import dask.dataframe as dd

    return dd.read_parquet([glob.escape(u) for u in urls], storage_options=options, dataset={"partitioning": None})


def _refuse_credentials(storage_options: Optional[dict] = None, **urls: Any) -> None:
    """A URL holding a password or a user name, refused before any store is asked (whose errors would quote it),
    naming where it was given; the credentials hint in the API's words."""
    with speaking_to("api"):
        for name, url in urls.items():
            refuse_credentials_in_url(name, url)
        for name, value in (storage_options or {}).items():
            refuse_credentials_in_url(f"storage_options[{name!r}]", value)


def _in_types_of(schema, table):
    """`table` with each column that `schema` has in its type and field metadata (the embedding's `dim`), where
    its values fit: pandas made integers with nulls floats and strings large_string. The table's pandas metadata
    stays (its index)."""
    import pyarrow as pa

    columns, fields = [], []
    for field_, column in zip(table.schema, table.columns):
        if field_.name in schema.names:
            try:
                column, field_ = column.cast(schema.field(field_.name).type), schema.field(field_.name)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                pass  # changed in memory into values of another type: kept as they are
        columns.append(column)
        fields.append(field_)
    return pa.Table.from_arrays(columns, schema=pa.schema(fields, metadata=table.schema.metadata))
