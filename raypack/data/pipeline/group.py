"""Stage 3 of `raypack prepare`, group (only when some arm has a `pack.grouping`): content vectors and clusters,
or the data's own topics.

Input: the tokenized cache's files (raypack.data.pipeline.cache), of which the candidate samples (every sample
some over-length policy may keep, both splits: cache.candidates), so that one grouping serves every arm.

Output: `tok-<hash>/groups-<hash>/` (the folder prepare names from the grouping settings):

    vectors/*.parquet   key, piece, vector (float16, pack.feature_dim or the embedding's size): one per candidate
                        (not for topic)
    clusters.npz        keys, pieces, clusters (int), centroids: one cluster per candidate (topic: topics, the
                        sorted distinct topics, cluster c being topics[c]; no centroids)
    groups.json         backend, model, num_samples, num_clusters, cluster_sizes, seconds

keyed by (key, piece), the cache's key. Order: every dataset runs in input order and writes in order
(raypack.data.pipeline.ordered), but nothing relies on it: the k-means fit reads the vectors sorted by (key,
piece), clusters.npz is saved sorted so, and load_groups joins vectors and clusters on (key, piece), refusing
folders whose two files hold different samples, and returns them in that order, the candidates' cache order. The
planning stage checks the keys and pieces against its own samples before it uses a cluster or a vector
(raypack.data.pipeline.pack.plan_split).

Backends: `tfidf` (hashed TF-IDF sketches: a document-frequency pass, then vectors; raypack.data.features), or
`embedding` (a sentence encoder in an actor pool, on GPUs when prepare.embed_num_gpus). k-means centroids are
fitted in one task on at most pack.kmeans_samples evenly spaced vectors; every vector is then assigned.
`topic` reads the cache's topic column on the driver (no vectors, no k-means, pack.num_clusters must be 0):
one cluster per distinct topic (raypack.data.features.topic_clusters), and a ValueError when a candidate has
none.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data

from raypack.config import Config
from raypack.data import features
from raypack.data.pipeline.cache import candidates, read_cache_index
from raypack.data.pipeline.ordered import input_order, write_parquet_in_order
from raypack.data.prepared import shard_files
from raypack.model import load_tokenizer


def _kept_token_lists(batch: pa.Table) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Keys, pieces and token ids of the batch's candidate samples (both splits, any policy: candidates)."""
    batch = batch.filter(pa.array(candidates(batch)))
    ids = batch.column("input_ids").combine_chunks()
    offsets, values = ids.offsets.to_numpy(), ids.values.to_numpy(zero_copy_only=False)
    samples = [values[offsets[i]:offsets[i + 1]] for i in range(len(batch))]
    return batch.column("key").to_numpy(), batch.column("piece").to_numpy(), samples


def _vector_table(keys: np.ndarray, pieces: np.ndarray, vectors: np.ndarray) -> pa.Table:
    flat = pa.array(vectors.astype(np.float16).reshape(-1))
    return pa.table({"key": pa.array(keys, pa.int64()), "piece": pa.array(pieces, pa.int32()),
                     "vector": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])})


def _df_batch(batch: pa.Table, num_buckets: int) -> pa.Table:
    _, _, samples = _kept_token_lists(batch)
    df = features.document_frequency(samples, num_buckets).astype(np.int32)
    return pa.table({"num_docs": pa.array([len(samples)], pa.int64()),
                     "df": pa.FixedSizeListArray.from_arrays(pa.array(df), num_buckets)})


def _tfidf_batch(batch: pa.Table, df: np.ndarray, num_docs: int, dim: int, seed: int) -> pa.Table:
    keys, pieces, samples = _kept_token_lists(batch)
    return _vector_table(keys, pieces, features.tfidf_vectors(samples, df, num_docs, dim=dim, seed=seed))


class EmbedBatch:
    """Ray Data actor: sentence embeddings of the samples' decoded text (pack.group_backend=embedding)."""

    def __init__(self, model: str, tokenizer: str, device: str):
        from raypack.model import load_sentence_encoder  # torch, only in these actors

        self.tokenizer = load_tokenizer(tokenizer)
        self.encoder = load_sentence_encoder(model, device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        keys, pieces, samples = _kept_token_lists(batch)
        texts = self.tokenizer.batch_decode([s.tolist() for s in samples], skip_special_tokens=True)
        vectors = self.encoder.encode(texts, normalize_embeddings=True, batch_size=64, show_progress_bar=False)
        return _vector_table(keys, pieces, np.asarray(vectors, dtype=np.float32).reshape(len(samples), -1))


def _assign_batch(batch: pa.Table, centroids: np.ndarray) -> pa.Table:
    vectors = _vectors_of(batch)
    return pa.table({"key": batch.column("key"), "piece": batch.column("piece"),
                     "cluster": pa.array(features.assign_clusters(vectors, centroids), pa.int32())})


def _vectors_of(table: pa.Table) -> np.ndarray:
    column = table.column("vector").combine_chunks()
    return column.values.to_numpy(zero_copy_only=False).reshape(len(table), column.type.list_size)


def _read_vectors(vector_files: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """keys, pieces and vectors of these files, sorted by (key, piece): the cache's order, whatever the files'."""
    table = pq.read_table(vector_files, columns=["key", "piece", "vector"])
    keys, pieces = table.column("key").to_numpy(), table.column("piece").to_numpy()
    order = np.lexsort((pieces, keys))
    return keys[order], pieces[order], _vectors_of(table)[order]


@ray.remote
def _fit_centroids(vector_files: list[str], k: int, max_samples: int, seed: int) -> np.ndarray:
    """k-means centroids fitted on at most max_samples evenly spaced vectors, in (key, piece) order."""
    return features.fit_kmeans(_read_vectors(vector_files)[2].astype(np.float32), k, seed=seed,
                               max_samples=max_samples)


def _write_vectors(cfg: Config, files: list[str], folder: Path) -> None:
    """The candidates' vectors (tfidf: a document-frequency pass first; or embeddings) into folder/*.parquet."""
    pack, prep = cfg.pack, cfg.prepare
    ds = ray.data.read_parquet(files).select_columns(["key", "piece", "status", "num_supervised_tokens", "input_ids"])
    if pack.group_backend == "tfidf":
        num_buckets = features.NUM_BUCKETS
        df, num_docs = np.zeros(num_buckets, np.int64), 0
        for batch in ds.map_batches(_df_batch, batch_format="pyarrow", batch_size=prep.tokenize_batch_size * 8,
                                    fn_kwargs={"num_buckets": num_buckets},
                                    num_cpus=prep.read_num_cpus).iter_batches(batch_format="pyarrow"):
            num_docs += int(pa.compute.sum(batch.column("num_docs")).as_py() or 0)
            df += batch.column("df").combine_chunks().values.to_numpy().reshape(len(batch), -1).sum(axis=0)
        vectors = ds.map_batches(_tfidf_batch, batch_format="pyarrow", batch_size=prep.tokenize_batch_size * 4,
                                 fn_kwargs={"df": df, "num_docs": num_docs, "dim": pack.feature_dim, "seed": cfg.seed},
                                 num_cpus=prep.read_num_cpus)
    else:
        vectors = ds.map_batches(
            EmbedBatch, batch_format="pyarrow", batch_size=prep.tokenize_batch_size,
            compute=ray.data.ActorPoolStrategy(size=prep.num_tokenizer_actors), num_cpus=prep.actor_num_cpus,
            num_gpus=prep.embed_num_gpus,
            fn_constructor_kwargs={"model": pack.embedding_model, "tokenizer": cfg.data.tokenizer,
                                   "device": "cuda" if prep.embed_num_gpus else "cpu"})
    write_parquet_in_order(vectors, str(folder), prep.write_num_cpus)


def build_groups(cfg: Config, files: list[str], out: Path) -> Path:
    """Content vectors and k-means clusters of every candidate sample of the cache's `files`, as Ray Data stages,
    into `out` (module docstring); reused when present (prepare.reuse)."""
    pack, prep = cfg.pack, cfg.prepare
    model = pack.embedding_model if pack.group_backend == "embedding" else None
    if prep.reuse and (out / "groups.json").exists():
        return out
    start = time.perf_counter()
    print(f"raypack prepare: grouping samples by content ({pack.group_backend})", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    if pack.group_backend == "topic":
        return _topic_groups(files, out, start)
    out.mkdir(parents=True)
    with input_order(prep.block_mb):
        _write_vectors(cfg, files, out / "vectors")
        vector_files = shard_files(out / "vectors")
        num_samples = sum(pq.ParquetFile(f).metadata.num_rows for f in vector_files)
        k = features.resolve_num_clusters(pack.num_clusters, num_samples)
        centroids = ray.get(_fit_centroids.options(num_cpus=prep.pack_num_cpus).remote(
            vector_files, k, pack.kmeans_samples, cfg.seed))
        assigned = pa.concat_tables(ray.data.read_parquet(vector_files).map_batches(
            _assign_batch, batch_format="pyarrow", fn_kwargs={"centroids": centroids},
            num_cpus=prep.read_num_cpus).iter_batches(batch_format="pyarrow"))
    keys, pieces = assigned.column("key").to_numpy(), assigned.column("piece").to_numpy()
    order = np.lexsort((pieces, keys))  # keyed: saved in the cache's order, whatever order the batches came in
    clusters = assigned.column("cluster").to_numpy()[order]
    np.savez(out / "clusters.npz", keys=keys[order], pieces=pieces[order], clusters=clusters, centroids=centroids)
    info = {"backend": pack.group_backend, "model": model, "num_samples": int(num_samples),
            "num_clusters": int(k), "cluster_sizes": np.bincount(clusters, minlength=k).tolist(),
            "seconds": time.perf_counter() - start}
    (out / "groups.json").write_text(json.dumps(info, indent=2))
    print(f"raypack prepare: {num_samples:,} samples in {k} clusters ({info['seconds']:.1f} s)", flush=True)
    return out


def _topic_groups(files: list[str], out: Path, start: float) -> Path:
    """pack.group_backend=topic: each candidate's cluster is its topic's index among the sorted distinct topics."""
    table = read_cache_index(files, ["status", "num_supervised_tokens", "topic"])
    chosen = candidates(table)
    topics = np.array(table.column("topic").to_pylist(), dtype=object)[chosen]
    sources = None
    if (topics == "").any():  # the error names a record, so read where the records came from
        sources = np.array(pq.read_table(files, columns=["source"]).column("source").to_pylist(), dtype=object)
        sources = sources[chosen]
    clusters, distinct = features.topic_clusters(topics, sources)
    keys, pieces = table.column("key").to_numpy()[chosen], table.column("piece").to_numpy()[chosen]
    out.mkdir(parents=True)
    np.savez(out / "clusters.npz", keys=keys, pieces=pieces, clusters=clusters, topics=np.array(distinct, dtype=str))
    info = {"backend": "topic", "model": None, "num_samples": len(keys), "num_clusters": len(distinct),
            "cluster_sizes": np.bincount(clusters, minlength=len(distinct)).tolist(),
            "seconds": time.perf_counter() - start}
    (out / "groups.json").write_text(json.dumps(info, indent=2))
    print(f"raypack prepare: {len(keys):,} samples in {len(distinct)} topics ({info['seconds']:.1f} s)", flush=True)
    return out


def load_groups(folder: str | Path) -> dict:
    """What build_groups wrote, joined by (key, piece) and in that order (the candidates' cache order): keys,
    pieces, clusters, float16 vectors (None for topic groups; their `topics` instead). Raises RuntimeError if
    vectors/ and clusters.npz hold different samples."""
    folder = Path(folder)
    arrays = np.load(folder / "clusters.npz")
    info = json.loads((folder / "groups.json").read_text())
    if info["backend"] == "topic":  # saved in (key, piece) order by _topic_groups, with no vectors to join
        return {"keys": arrays["keys"], "pieces": arrays["pieces"], "clusters": arrays["clusters"], "vectors": None,
                "num_clusters": info["num_clusters"], "backend": "topic", "topics": arrays["topics"].tolist()}
    keys, pieces, vectors = _read_vectors(shard_files(folder / "vectors"))
    order = np.lexsort((arrays["pieces"], arrays["keys"]))
    if not (np.array_equal(arrays["keys"][order], keys) and np.array_equal(arrays["pieces"][order], pieces)):
        raise RuntimeError(f"content groups {folder}: vectors/ and clusters.npz do not hold the same samples "
                           f"({len(keys)} vectors, {len(order)} clusters); prepare again with prepare.reuse=false")
    return {"keys": keys, "pieces": pieces, "clusters": arrays["clusters"][order], "vectors": vectors,
            "num_clusters": info["num_clusters"], "backend": info["backend"]}
