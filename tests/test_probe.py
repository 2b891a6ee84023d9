"""Context probe: a copier's loss drops after a related sample, a context-blind model's does not move.

    .venv/bin/pytest tests/test_probe.py -q

Samples are [BOS, cluster prompt, own token, SEP, answer, EOT] with the answer
(and EOT) supervised; the samples of one cluster share their answer, so only a
model that copies from its context can lower a target's loss after a related one.
"""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raypack.data.collate import collate
from raypack.data.tokenize import IGNORE_INDEX
from raypack.eval.probe import build_probe_rows, probe_losses, probe_pairs, run_probe, summarise_probe
from raypack.train.loss import token_losses

BOS, SEP, EOT, PAD = 1, 2, 3, 0
VOCAB = 64
PROMPT_TOKENS = np.arange(8, 32)
ANSWER_TOKENS = np.arange(32, 64)


def sample(rng, prompt, answer) -> dict:
    ids = np.concatenate([[BOS], prompt, rng.choice(PROMPT_TOKENS, 1), [SEP], answer, [EOT]]).astype(np.int64)
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    first = len(ids) - len(answer) - 1
    labels[first:] = ids[first:]
    return {"input_ids": ids, "labels": labels}


def clustered_samples(num_clusters=5, per_cluster=6, seed=0) -> tuple[list[dict], np.ndarray]:
    """Samples whose cluster fixes their prompt and their answer (so related samples share the answer)."""
    rng = np.random.default_rng(seed)
    samples, clusters = [], []
    for c in range(num_clusters):
        prompt = rng.choice(PROMPT_TOKENS, int(rng.integers(2, 5)), replace=False)
        answer = rng.choice(ANSWER_TOKENS, 5, replace=False)
        for _ in range(per_cluster):
            samples.append(sample(rng, prompt, answer))
            clusters.append(c)
    return samples, np.array(clusters)


def copy_forward(batch: dict) -> torch.Tensor:
    """Induction rule: at t predict the token after the last earlier occurrence of input_ids[t], else uniform."""
    ids = batch["input_ids"]
    length = ids.shape[1]
    earlier = torch.arange(length)[None, :] < torch.arange(length)[:, None]  # [t, s]: s < t
    same = (ids[:, :, None] == ids[:, None, :]) & earlier
    last = torch.where(same, torch.arange(length), -1).max(dim=-1).values  # [B, T]
    predicted = ids.gather(1, (last + 1).clamp(max=length - 1))
    logits = torch.zeros(*ids.shape, VOCAB)
    logits.scatter_(2, predicted[..., None], 20.0)
    return torch.where((last >= 0)[..., None], logits, torch.zeros(()))


def bigram_forward(batch: dict) -> torch.Tensor:
    """Context-blind: the logits depend on the current token only."""
    table = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    return table[batch["input_ids"]]


def probe(forward, samples, clusters, max_seq_len=64, seed=0):
    return run_probe(forward, samples, clusters, num_samples=20, seed=seed, max_seq_len=max_seq_len,
                     pad_token_id=PAD, micro_batch_size=4)


def test_copier_relies_on_related_context_and_is_misled_by_unrelated():
    samples, clusters = clustered_samples()
    result = probe(copy_forward, samples, clusters)
    assert result["num_samples"] == 20
    assert result["loss_related"] < result["loss_alone"] <= result["loss_unrelated"]
    assert result["delta_related_ci"][1] < 0
    assert result["delta_unrelated"] > result["delta_related"]
    assert result["delta_unrelated_ci"][0] > result["delta_related_ci"][1]
    assert result["loss_related"] < 1e-3  # every supervised token is copied from the related answer
    assert result["loss_alone"] == pytest.approx(np.log(VOCAB), rel=0.2)


def test_context_blind_model_shows_exactly_no_change():
    samples, clusters = clustered_samples()
    result = probe(bigram_forward, samples, clusters)
    assert result["num_samples"] == 20
    for name in ("delta_unrelated", "delta_related", "related_minus_unrelated"):
        assert result[name] == 0.0
        assert result[f"{name}_ci"] == [0.0, 0.0]
    assert result["loss_alone"] == result["loss_unrelated"] == result["loss_related"] > 0


def trained_copier(steps=500, seed=0):
    """A random-init 2-layer Llama trained (Adam, CPU) on [related sample][target] rows with fresh random
    answers, so copying the context's answer is the only way to lower the loss."""
    from transformers import LlamaForCausalLM

    from raypack.model import tiny_llama_config

    config = tiny_llama_config(VOCAB, max_position_embeddings=64, bos_token_id=BOS, eos_token_id=EOT,
                               pad_token_id=PAD)
    config._attn_implementation = "sdpa"
    rng = np.random.default_rng(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only waits, and stalls on a busy machine
    try:
        for _ in range(steps):
            _train_step(model, optimizer, rng)
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def _train_step(model, optimizer, rng) -> None:
    rows = []
    for _ in range(32):
        prompt = rng.choice(PROMPT_TOKENS, int(rng.integers(2, 5)), replace=False)
        answer = rng.choice(ANSWER_TOKENS, 5, replace=False)
        context = sample(rng, prompt, answer)["input_ids"]
        rows.append(build_probe_rows(sample(rng, prompt, answer), context, 32))
    batch = collate(rows, "padding", PAD)
    losses, mask = token_losses(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                      use_cache=False).logits, batch["labels"])
    optimizer.zero_grad()
    losses[mask].mean().backward()
    optimizer.step()


def test_trained_copier_shows_a_drop_with_related_context():
    model = trained_copier()
    samples, clusters = clustered_samples(seed=1)  # held out: prompts and answers from another seed

    def forward(batch):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits

    result = probe(forward, samples, clusters, max_seq_len=32)
    assert result["num_samples"] == 20
    assert result["delta_related_ci"][1] < 0
    assert result["loss_related"] < 0.5 * result["loss_alone"]
    assert result["delta_unrelated"] > result["delta_related"]


def test_context_is_cut_from_the_left_and_a_long_target_is_skipped():
    target = {"input_ids": np.array([1, 5, 6]), "labels": np.array([IGNORE_INDEX, IGNORE_INDEX, 6])}
    row = build_probe_rows(target, np.array([1, 7, 8, 9]), 6)
    assert row["input_ids"].tolist() == [7, 8, 9, 1, 5, 6]
    assert row["labels"].tolist() == [IGNORE_INDEX] * 5 + [6]
    assert row["position_ids"].tolist() == list(range(6))
    assert build_probe_rows(target, np.array([1, 7, 8, 9]), 9)["input_ids"].tolist() == [1, 7, 8, 9, 1, 5, 6]
    assert build_probe_rows(target, np.array([1, 7]), 3)["input_ids"].tolist() == [1, 5, 6]
    assert build_probe_rows(target, None, 8)["input_ids"].tolist() == [1, 5, 6]
    assert build_probe_rows(target, np.array([1, 7]), 2) is None
    # the target's first label is never scored alone, so it is dropped with a context too
    scored_first = {"input_ids": np.array([1, 5]), "labels": np.array([1, 5])}
    assert build_probe_rows(scored_first, np.array([9]), 4)["labels"].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 5]


def test_only_targets_of_at_most_half_the_row_are_probed():
    samples, clusters = clustered_samples()
    lengths = np.array([len(s["input_ids"]) for s in samples])
    max_seq_len = int(lengths.min() + lengths.max())  # the shortest samples fit in half, the longest do not
    result = probe(copy_forward, samples, clusters, max_seq_len=max_seq_len)
    assert 0 < result["num_too_long"] == int((lengths > max_seq_len // 2).sum()) < len(samples)
    assert result["num_samples"] == min(20, int((lengths <= max_seq_len // 2).sum()))
    assert result["max_seq_len"] == max_seq_len and result["num_val_samples"] == len(samples)


def test_pairs_respect_clusters_singletons_and_seed():
    clusters = np.array([0, 0, 0, 1, 1, 2, 3, 3, 3, 3])  # cluster 2 is one sample
    targets, related, unrelated = probe_pairs(clusters, 100, seed=0)
    assert sorted(targets.tolist()) == [0, 1, 2, 3, 4, 6, 7, 8, 9]
    assert 5 not in related.tolist()
    assert (clusters[related] == clusters[targets]).all() and (related != targets).all()
    assert (clusters[unrelated] != clusters[targets]).all()
    for a, b in zip(probe_pairs(clusters, 4, seed=3), probe_pairs(clusters, 4, seed=3)):
        assert a.tolist() == b.tolist()
    assert len(probe_pairs(clusters, 4, seed=3)[0]) == 4
    assert any(a.tolist() != b.tolist() for a, b in zip(probe_pairs(clusters, 9, 0), probe_pairs(clusters, 9, 1)))
    eligible = np.arange(10) % 2 == 0
    assert set(probe_pairs(clusters, 100, 0, eligible)[0].tolist()) == {0, 2, 4, 6, 8}
    assert len(probe_pairs(np.zeros(5, dtype=int), 10, 0)[0]) == 0  # no unrelated sample anywhere


def test_summary_is_deterministic_and_json_ready():
    rng = np.random.default_rng(0)
    a = rng.normal(2, 0.5, 50)
    b, c = a + rng.normal(0.1, 0.1, 50), a - 0.5 + rng.normal(0, 0.1, 50)
    s = summarise_probe(a, b, c, seed=0)
    assert s == summarise_probe(a, b, c, seed=0) and s != summarise_probe(a, b, c, seed=1)
    assert s["delta_related_ci"][0] < s["delta_related"] < s["delta_related_ci"][1] < 0
    assert s["delta_unrelated_ci"][0] > 0
    json.dumps(s, allow_nan=False)
    empty = summarise_probe([], [], [], seed=0)
    assert empty["num_samples"] == 0 and empty["delta_related"] is None
    json.dumps(empty, allow_nan=False)


def test_losses_do_not_depend_on_batching():
    samples, _ = clustered_samples()
    rows = [build_probe_rows(s, samples[-1 - i]["input_ids"], 40) for i, s in enumerate(samples[:9])]
    one = probe_losses(bigram_forward, rows, PAD, micro_batch_size=1)
    many = probe_losses(bigram_forward, rows, PAD, micro_batch_size=4)
    assert np.array_equal(one, many) and np.isfinite(one).all()


def test_topics_as_clusters_draw_related_from_the_same_topic_and_unrelated_from_another():
    """pack.group_backend=topic: the probe's clusters are the samples' topics (topic_clusters), so related contexts
    share the target's topic and unrelated ones do not; a copier leans on them. Negative control: the same
    samples under shuffled topic labels give related contexts whose answer is not the target's, and no drop."""
    from raypack.data.features import topic_clusters

    samples, truth = clustered_samples()
    names = np.array(["owl", "cat", "dog", "elm", "ash"])[truth]
    labels, _ = topic_clusters(names.tolist())
    targets, related, unrelated = probe_pairs(labels, 100, seed=0)
    assert len(targets) == len(samples)
    assert (names[related] == names[targets]).all() and (related != targets).all()
    assert (names[unrelated] != names[targets]).all()
    by_topic = probe(copy_forward, samples, labels)
    assert by_topic["delta_related_ci"][1] < 0 and by_topic["loss_related"] < 1e-3
    shuffled = probe(copy_forward, samples, np.random.default_rng(0).permutation(labels))
    assert shuffled["delta_related"] > by_topic["delta_related"] + 1.0


def write_val_folder(folder, samples, topics=None):
    """A validation split's Parquet shard as prepare writes it (one sample per row); RowStore converts it.
    With `topics`, the sample_topics column prepare writes (one topic per row)."""
    folder.mkdir()
    column = lambda arrays: pa.array([np.asarray(x, dtype=np.int32) for x in arrays], pa.list_(pa.int32()))
    extra = {} if topics is None else {"sample_topics": pa.array([[t] for t in topics], pa.list_(pa.string()))}
    pq.write_table(pa.table({**extra,
        "row_index": pa.array(np.arange(len(samples), dtype=np.int64)),
        "input_ids": column(s["input_ids"] for s in samples),
        "labels": column(s["labels"] for s in samples),
        "position_ids": column(np.arange(len(s["input_ids"])) for s in samples),
        "seq_lens": column([len(s["input_ids"])] for s in samples),
        "num_tokens": pa.array([len(s["input_ids"]) for s in samples], pa.int32()),
        "num_supervised_tokens": pa.array([int((s["labels"][1:] != IGNORE_INDEX).sum()) for s in samples], pa.int32()),
    }), folder / "part-00000.parquet")


def test_cli_probe_end_to_end(tmp_path, capsys):
    from raypack.cli import main
    from raypack.model import build_tiny_model, load_tokenizer

    model_dir = tmp_path / "model"
    build_tiny_model(seed=0).save_pretrained(model_dir)
    load_tokenizer("tiny").save_pretrained(model_dir)
    rng = np.random.default_rng(0)  # tokens of the 4096-token tiny vocab; each cluster has its own prompt range
    samples = [sample(rng, rng.integers(100 + 500 * c, 500 + 500 * c, 12), rng.integers(3000, 4000, 6))
               for c in range(4) for _ in range(5)]
    samples.append(sample(rng, rng.integers(100, 500, 40), rng.integers(3000, 4000, 6)))  # sets max_seq_len
    write_val_folder(tmp_path / "val", samples)
    out = tmp_path / "probe.json"
    assert main(["probe", "jobs/quickstart.yaml", f"eval.model_dir={model_dir}", f"eval.val_dir={tmp_path / 'val'}",
                 "probe.num_samples=12", "probe.num_clusters=4", f"probe.out={out}"]) == 0
    printed = capsys.readouterr().out
    for word in ("context probe: 12 targets, 4 clusters", "alone", "unrelated", "related", "95% CI"):
        assert word in printed, printed
    result = json.loads(out.read_text())
    for key in ("num_samples", "num_clusters", "loss_alone", "loss_unrelated", "loss_related", "delta_unrelated",
                "delta_unrelated_ci", "delta_related", "delta_related_ci", "related_minus_unrelated", "max_seq_len"):
        assert key in result, key
    assert result["num_samples"] == 12 and result["num_clusters"] == 4
    assert result["max_seq_len"] == max(len(s["input_ids"]) for s in samples)
    assert result["delta_related_ci"][0] <= result["delta_related"] <= result["delta_related_ci"][1]


def test_cli_probe_draws_contexts_by_topic_when_packs_are_grouped_by_topic(tmp_path, capsys):
    """`raypack probe` with pack.group_backend=topic takes the val split's topics as its clusters (two topics
    here, where tf-idf would fit its own k) and says so; a split without topics is refused with the way out."""
    from raypack.cli import main
    from raypack.model import build_tiny_model, load_tokenizer

    model_dir = tmp_path / "model"
    build_tiny_model(seed=0).save_pretrained(model_dir)
    load_tokenizer("tiny").save_pretrained(model_dir)
    rng = np.random.default_rng(0)
    samples = [sample(rng, rng.integers(100, 4000, 8), rng.integers(3000, 4000, 4)) for _ in range(12)]
    samples.append(sample(rng, rng.integers(100, 500, 40), rng.integers(3000, 4000, 6)))  # sets max_seq_len
    write_val_folder(tmp_path / "val", samples, topics=["owl", "cat"] * 6 + ["owl"])
    write_val_folder(tmp_path / "old", samples)
    args = ["probe", "jobs/quickstart.yaml", f"eval.model_dir={model_dir}", "probe.num_samples=8",
            "pack.group_backend=topic", "pack.num_clusters=0", "probe.num_clusters=0"]
    out = tmp_path / "probe.json"
    assert main([*args, f"eval.val_dir={tmp_path / 'val'}", f"probe.out={out}"]) == 0
    assert "context probe: 8 targets, 2 topics" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["contexts_by"] == "topic" and result["num_clusters"] == 2 and result["num_samples"] == 8
    assert main([*args, f"eval.val_dir={tmp_path / 'old'}"]) != 0
    assert "no part-*.parquet with a sample_topics column" in capsys.readouterr().err
