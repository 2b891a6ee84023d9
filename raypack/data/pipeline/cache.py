"""Stage 2 of `raypack prepare`, tokenize: the read rows into the tokenized cache, and how later stages read it.

Input: the read stage's rows (raypack.data.pipeline.read: key, source, raw, fmt, reason, detail), in input order.
An actor pool (TokenizeBatch; the tokenizer loads once per actor) normalises and tokenizes whole batches with
raypack.data.tokenize.tokenize_pieces: no over-length policy, so one cache serves every policy.

Output: `tok-<hash>/tokenized/*.parquet`, columns TOKENIZED_SCHEMA, one row per

    sample piece  a conversation that fits is one row (status `whole`, piece 0); a longer one is ALL its
                  consecutive max_seq_len pieces (status `long`, piece 0, 1, ...)
    rejected record   status `rejected`, with reason and detail, no tokens
    dropped record    a conversation with no supervised token (status `dropped_no_supervised`), no tokens

Every sample row carries its record's `topic` (raypack.data.formats.row_topic; "" without one), what
pack.group_backend=topic groups by. Keyed by (key, piece): key is the read stage's (one per input record),
piece the piece number. Order: input order, by key, a key's pieces 0, 1, ... in a row. The stage runs in
input order and writes each file in order (raypack.data.pipeline.ordered); readers take the files by their
first key (cache_files) and check the order (read_cache_index: when the cache is written, and whenever
prepare reuses it), since the later stages address the cache's samples by their ordinal in this order
(raypack.data.pipeline.pack). Beside it `tokenized.json` (the pass's counts: summarise_tokenized) and
`rejected/rejected.jsonl` (every rejected record: source file, row, reason, detail).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data

from raypack.config import OVERLENGTH_POLICIES, Config, PrepareConfig
from raypack.data import formats
from raypack.data.overlength import LONG, kept_rows, policy_counts
from raypack.data.pipeline.ordered import input_order, write_parquet_in_order
from raypack.data.pipeline.read import RAW_COLUMNS, Inputs, read_sources
from raypack.data.prepared import shard_files
from raypack.data.tokenize import IGNORE_INDEX, tokenize_pieces
from raypack.model import load_tokenizer

STATUS_REJECTED = "rejected"
TOKENIZED_SCHEMA = pa.schema([
    ("key", pa.int64()), ("piece", pa.int32()), ("status", pa.string()), ("reason", pa.string()),
    ("detail", pa.string()), ("source", pa.string()), ("num_tokens", pa.int32()),
    ("num_supervised_tokens", pa.int32()), ("num_turns", pa.int32()), ("topic", pa.string()),
    ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
])
CACHE_VERSION = 4  # 2: num_turns (assistant messages of the sample's conversation); 3: every piece of a long
# conversation, the over-length policy applied per split (raypack.data.overlength); 4: topic (the record's topic
# field, "" without one: raypack.data.formats.row_topic)


def list_column(arrays: list[np.ndarray]) -> pa.ListArray:
    """An int32 list column of these arrays, built from one concatenation (no Python loop over values)."""
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    values = np.concatenate(arrays).astype(np.int32, copy=False) if arrays else np.zeros(0, np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


class TokenizeBatch:
    """Ray Data actor: normalise and tokenize a batch of records (every piece of a long one: tokenize_pieces)."""

    def __init__(self, data_cfg: dict):
        self.data = data_cfg
        self.tokenizer = load_tokenizer(data_cfg["tokenizer"])

    def __call__(self, batch: pa.Table) -> pa.Table:
        records = batch.select(list(RAW_COLUMNS)).to_pylist()
        rows_of: list[list[dict]] = [[] for _ in records]  # output rows per record, in input order
        conversations, conv_record = [], []
        for i, rec in enumerate(records):
            reason, detail = rec["reason"], rec["detail"]
            if not reason:
                try:
                    conversations.append(formats.normalise_row(json.loads(rec["raw"]), rec["fmt"], rec["source"]))
                    conv_record.append(i)
                    continue
                except formats.RowError as err:
                    reason, detail = err.reason, err.detail
            if self.data["strict"]:
                raise formats.FormatError(f"{rec['source']}: {reason}: {detail}")
            rows_of[i].append(self._row(rec, 0, STATUS_REJECTED, reason, detail))
        result = tokenize_pieces(conversations, self.tokenizer, self.data["max_seq_len"],
                                 template=self.data["template"])
        for sample in result.samples:
            i = conv_record[sample["conversation"]]
            conversation = conversations[sample["conversation"]]
            rows_of[i].append(self._row(records[i], sample["piece"], result.outcomes[sample["conversation"]],
                                        "", "", sample, formats.num_assistant_turns(conversation),
                                        conversation["topic"]))
        for conv_index, outcome in enumerate(result.outcomes):
            i = conv_record[conv_index]
            if not rows_of[i]:  # dropped: one row records the outcome so the counts reconcile
                rows_of[i].append(self._row(records[i], 0, outcome, "", ""))
        return self._table([row for rows in rows_of for row in rows])

    @staticmethod
    def _row(rec: dict, piece: int, status: str, reason: str, detail: str, sample: dict | None = None,
             num_turns: int = 0, topic: str = "") -> dict:
        empty = np.zeros(0, dtype=np.int32)
        ids = sample["input_ids"] if sample else empty
        labels = sample["labels"] if sample else empty
        return {"key": rec["key"], "piece": piece, "status": status, "reason": reason, "detail": detail,
                "source": rec["source"], "num_turns": num_turns, "topic": topic, "input_ids": ids,
                "labels": labels}

    @staticmethod
    def _table(rows: list[dict]) -> pa.Table:
        ids = [r["input_ids"] for r in rows]
        labels = [r["labels"] for r in rows]
        columns = {name: [r[name] for r in rows]
                   for name in ("key", "piece", "status", "reason", "detail", "source", "num_turns", "topic")}
        columns["num_tokens"] = [len(a) for a in ids]
        columns["num_supervised_tokens"] = [int(np.count_nonzero(a != IGNORE_INDEX)) for a in labels]
        arrays = [pa.array(columns[f.name], f.type) for f in TOKENIZED_SCHEMA if f.name in columns]
        return pa.Table.from_arrays(arrays + [list_column(ids), list_column(labels)], schema=TOKENIZED_SCHEMA)


def _user_error(err: BaseException) -> formats.FormatError | None:
    """The FormatError (a bad file, or a bad row in strict mode) behind a Ray task failure, if any.

    Ray re-raises a worker's exception as a RayTaskError whose text carries the
    original traceback; the original object is not always kept, so read the text.
    """
    marker = f"{formats.FormatError.__module__}.FormatError: "
    for line in reversed(str(err).splitlines()):
        if line.startswith(marker):
            return formats.FormatError(line[len(marker):])
    return None


def tokenize_to_cache(cfg: Config, tok_dir: Path, inputs: Inputs | None = None) -> dict:
    """Run read -> tokenize on Ray Data into tok_dir/tokenized, in input order; returns the pass's counts."""
    prep: PrepareConfig = cfg.prepare
    staging = tok_dir / "tokenized.partial"
    shutil.rmtree(staging, ignore_errors=True)
    with input_order(prep.block_mb):  # small blocks, so every actor gets work even from one big file
        ds = read_sources(cfg, inputs).map_batches(
            TokenizeBatch, batch_format="pyarrow", batch_size=prep.tokenize_batch_size,
            compute=ray.data.ActorPoolStrategy(size=prep.num_tokenizer_actors), num_cpus=prep.actor_num_cpus,
            fn_constructor_kwargs={"data_cfg": asdict(cfg.data)})
        try:
            write_parquet_in_order(ds, str(staging), prep.write_num_cpus)
        except Exception as err:  # Ray wraps a worker's exception; surface ours as itself
            raise _user_error(err) or err
    files = cache_files(staging)
    counts = summarise_tokenized(files)
    _write_rejected(files, tok_dir / "rejected" / "rejected.jsonl")
    shutil.rmtree(tok_dir / "tokenized", ignore_errors=True)
    staging.rename(tok_dir / "tokenized")
    (tok_dir / "tokenized.json").write_text(json.dumps(counts, indent=2))
    return counts


def summarise_tokenized(files: list[str]) -> dict:
    """Counts of the tokenization pass, from the cache's small columns (read_cache_index: in input order).

    `num_long`: conversations longer than max_seq_len (kept as all their pieces); `num_tokens`: every token the
    tokenizer produced; `policies`: what each over-length policy makes of the input (raypack.data.overlength).
    """
    table = read_cache_index(files, ["status", "reason", "num_tokens", "num_supervised_tokens"])
    key = table.column("key").to_numpy()
    piece = table.column("piece").to_numpy()
    status = np.array(table.column("status").to_pylist(), dtype=object)
    first = piece == 0
    reasons = [r for r, s in zip(table.column("reason").to_pylist(), status) if s == STATUS_REJECTED]
    num_tokens, num_supervised = (table.column(c).to_numpy() for c in ("num_tokens", "num_supervised_tokens"))
    return {
        "num_input_rows": int(first.sum()),
        "num_rejected_rows": int((status == STATUS_REJECTED).sum()),
        "rejected_reasons": {r: reasons.count(r) for r in formats.REJECT_REASONS},
        "num_conversations": int((first & (status != STATUS_REJECTED)).sum()),
        "num_long": int((first & (status == LONG)).sum()),
        "num_tokens": int(num_tokens.sum()),
        "policies": {policy: policy_counts(key, status, piece, num_tokens, num_supervised, policy)
                     for policy in OVERLENGTH_POLICIES},
    }


def _write_rejected(files: list[str], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for path in files:
            table = pq.read_table(path, columns=["status", "source", "reason", "detail"])
            for row in table.filter(pa.compute.equal(table["status"], STATUS_REJECTED)).to_pylist():
                source, _, row_num = row["source"].rpartition(":")
                f.write(json.dumps({"source": source, "row": int(row_num), "reason": row["reason"],
                                    "detail": row["detail"]}) + "\n")


# ---------------------------------------------------------------- reading the cache


def cache_files(folder: str | Path) -> list[str]:
    """The cache's Parquet files in key order: by the (key, piece) of each file's first row, not by file name."""
    def first_row(path: str) -> tuple[int, int]:
        batch = next(pq.ParquetFile(path).iter_batches(batch_size=1, columns=["key", "piece"]), None)
        return (batch.column(0)[0].as_py(), batch.column(1)[0].as_py()) if batch and batch.num_rows else (-1, -1)

    return sorted(shard_files(folder), key=lambda path: (first_row(path), path))


def read_cache_index(files: list[str], columns: list[str]) -> pa.Table:
    """key, piece and these small columns of the whole cache, checked to be in input order: by key, a key's
    pieces 0, 1, ... in a row (what every reader of the cache by ordinal relies on). Raises RuntimeError naming
    the first row out of order, and the way out, otherwise."""
    names = ["key", "piece", *(c for c in columns if c not in ("key", "piece"))]
    table = pq.read_table(files, columns=names) if files else TOKENIZED_SCHEMA.empty_table().select(names)
    key, piece = table.column("key").to_numpy(), table.column("piece").to_numpy()
    bad = np.flatnonzero(~((np.diff(key) > 0) | ((np.diff(key) == 0) & (np.diff(piece) == 1))))
    if len(bad):
        i = int(bad[0])
        folder = Path(files[0]).parent
        raise RuntimeError(f"tokenized cache {folder} is not in input order: row {i + 1} (key {key[i + 1]}, piece "
                           f"{piece[i + 1]}) follows (key {key[i]}, piece {piece[i]}); prepare again with "
                           "prepare.reuse=false (if it recurs, report it with your Ray and pyarrow versions)")
    return table


def kept(table, overlength: str) -> np.ndarray:
    """Which rows of a cache table or batch are samples under the over-length policy."""
    status = np.array(table.column("status").to_pylist(), dtype=object)
    return kept_rows(status, table.column("piece").to_numpy(), table.column("num_supervised_tokens").to_numpy(),
                     overlength)


def candidates(table) -> np.ndarray:
    """Rows some policy may keep (every row that fits, every long piece with a target): what the content groups
    cover, so that one grouping serves every arm."""
    return kept(table, "split")
