"""Config loading, overrides and validation; every YAML in jobs/ must load.

    .venv/bin/pytest tests/test_config.py -q
"""

from pathlib import Path

import pytest

from raypack.config import (ArmSpec, Config, ConfigError, PackConfig, arm_spec, describe_fields, load_config,
                            parse_arm, setting_configs, to_dict)
from raypack.eval.tasks import SKIPPED_CODE, eval_tasks

JOBS = sorted((Path(__file__).parent.parent / "jobs").glob("*.yaml"))


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_every_job_yaml_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.name
    # No job runs model-written code (HumanEval) unless the user turns it on; the paper preset skips it instead.
    assert not cfg.eval.allow_code_execution, f"{path.name} enables eval.allow_code_execution"
    if cfg.eval.preset == "paper":
        humaneval = "humaneval_instruct" if cfg.eval.apply_chat_template else "humaneval"
        assert eval_tasks(cfg.eval)[1] == {humaneval: SKIPPED_CODE}


def test_a_job_that_enables_code_execution_is_caught(tmp_path):
    """Negative control for the check above: the key is read from the file, so a job setting it is seen."""
    job = Path(__file__).parent.parent / "jobs" / "paper-8b-tulu.yaml"
    text = job.read_text().replace("allow_code_execution: false", "allow_code_execution: true")
    (tmp_path / "job.yaml").write_text(text)
    cfg = load_config(tmp_path / "job.yaml")
    assert cfg.eval.allow_code_execution and eval_tasks(cfg.eval)[1] == {}


def test_jobs_folder_is_not_empty():
    assert JOBS, "jobs/ should hold at least the quickstart"


def test_defaults_load_without_file():
    cfg = load_config(None)
    assert cfg.data.max_seq_len == 4096 and cfg.pack.window == 0


def test_dotted_overrides_are_typed():
    cfg = load_config(None, ["pack.window=1000", "data.max_seq_len=2048", "pack.arms=[padding, bfd-cross]",
                             "data.strict=true", "name=x"])
    assert cfg.pack.window == 1000 and cfg.data.max_seq_len == 2048
    assert cfg.pack.arms == ["padding", "bfd-cross"] and cfg.data.strict is True and cfg.name == "x"


def test_exponent_floats_without_a_dot_are_floats(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-2 as a string; a float key takes it as the number a user means.
    cfg = load_config(None, ["optim.lr=1e-2", "sweep.lr=[1e-3, 3.0e-3, 2E-2]"])
    assert cfg.optim.lr == 0.01 and cfg.sweep.lr == [0.001, 0.003, 0.02]
    (tmp_path / "c.yaml").write_text("optim:\n  lr: 5e-4\n")
    assert load_config(tmp_path / "c.yaml").optim.lr == 0.0005
    with pytest.raises(ConfigError, match=r"optim\.lr: expected float"):
        load_config(None, ["optim.lr=1e-2x"])  # negative control: not a number
    with pytest.raises(ConfigError, match=r"data\.max_seq_len: expected int"):
        load_config(None, ["data.max_seq_len=1e3"])  # an int key stays an int key


def test_unknown_key_names_it_and_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["pack.windw=3"])
    assert "pack.windw" in str(err.value) and "window" in str(err.value) and "arms" in str(err.value)
    with pytest.raises(ConfigError, match="valid keys under the top level"):
        load_config(None, ["dat.max_seq_len=3"])


def test_unknown_key_in_yaml_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  max_len: 10\n")
    with pytest.raises(ConfigError, match=r"data\.max_len.*max_seq_len"):
        load_config(f)


@pytest.mark.parametrize("override, key", [
    ("data.max_seq_len=long", "data.max_seq_len"),
    ("data.max_seq_len=1.5", "data.max_seq_len"),
    ("data.strict=3", "data.strict"),
    ("pack.window=true", "pack.window"),
    ("pack.arms=bfd-cross", "pack.arms"),
    ("data=3", "data"),
])
def test_wrong_type_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_choices_are_enforced_and_listed():
    with pytest.raises(ConfigError, match="truncate, drop, split"):
        load_config(None, ["data.overlength=chop"])
    with pytest.raises(ConfigError, match="valid presets|opensource-1.2m"):
        load_config(None, ["synth.preset=nope"])


def test_arms_are_parsed_and_validated():
    assert parse_arm("padding") == ("padding", None)
    assert parse_arm("bfd-isolated") == ("bfd", "isolated")
    assert parse_arm("random-cross") == ("random", "cross")
    for bad in ("bfd", "padding-cross", "bfd-open", "best-isolated"):
        with pytest.raises(ConfigError, match="valid arms"):
            parse_arm(bad)
    with pytest.raises(ConfigError, match="duplicate"):
        load_config(None, ["pack.arms=[padding, padding]"])


def test_overlength_suffixes_and_the_papers_setting():
    """+truncate/+split/+drop on any arm; study.setting=paper swaps in the paper's arms, window and loss; both
    keeps the configured arms beside them."""
    assert arm_spec("padding+split", PackConfig()).overlength == "split"
    assert arm_spec("bfd-isolated+related+drop", PackConfig()) == ArmSpec("bfd", "isolated", "related", False, "drop")
    assert arm_spec("random-cross", PackConfig()).overlength is None  # data.overlength
    for bad, message in (("padding+related", "only an over-length suffix"), ("padding+split+drop", "at most one"),
                         ("greedy-cross+cut", "suffixes must be")):
        with pytest.raises(ConfigError, match=message):
            parse_arm(bad)
    base = load_config("jobs/paper-8b-tulu.yaml")
    paper = load_config("jobs/paper-8b-tulu.yaml", ["study.setting=paper"])
    (corrected,), (exact,) = setting_configs(base), setting_configs(paper)
    assert corrected == base
    assert exact.pack.arms == ["padding+truncate", "random-cross+split", "greedy-cross+drop"]
    assert (exact.pack.window, exact.train.loss_reduction, exact.study.match) == (1000, "paper", "epochs")
    assert (exact.optim, exact.train.epochs, exact.data) == (base.optim, base.train.epochs, base.data)
    both = setting_configs(load_config("jobs/paper-8b-tulu.yaml", ["study.setting=both"]))
    assert [c.pack.arms for c in both] == [base.pack.arms, exact.pack.arms]
    assert load_config("jobs/paper-8b-tulu.yaml", ["study.setting=paper", "train.arm=greedy-cross+drop"])
    with pytest.raises(ConfigError, match="train.arm"):
        load_config("jobs/paper-8b-tulu.yaml", ["train.arm=greedy-cross+drop"])  # not an arm of the corrected one
    with pytest.raises(ConfigError, match="already holds"):
        load_config(None, ["study.setting=both", "pack.arms=[padding, greedy-cross+drop]"])


def test_ranges_are_checked():
    with pytest.raises(ConfigError, match="pack.window"):
        load_config(None, ["pack.window=-1"])
    with pytest.raises(ConfigError, match="data.max_seq_len"):
        load_config(None, ["data.max_seq_len=0"])


def test_malformed_override():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["pack.window"])


def test_float_accepts_int_and_round_trip(tmp_path):
    cfg = load_config(None, ["synth.seed=3"])
    again = load_config(None, [f"{k}={v}" for k, v in [("synth.seed", to_dict(cfg)["synth"]["seed"])]])
    assert again.synth.seed == 3


def test_describe_fields_documents_every_key():
    text = "\n".join(describe_fields())
    for key in ("data.max_seq_len", "pack.window", "pack.arms", "synth.preset", "data.overlength"):
        assert key in text


def test_training_fields_are_checked():
    with pytest.raises(ConfigError, match="train.arm"):
        load_config(None, ["train.arm=bfd-cross", "pack.arms=[padding]"])
    with pytest.raises(ConfigError, match="train.checkpoint_every_steps"):
        load_config(None, ["train.checkpoint_every_steps=-1"])
    with pytest.raises(ConfigError, match="data.tokenizer=tiny"):
        load_config(None, ["data.tokenizer=gpt2"])
    with pytest.raises(ConfigError, match="flash_attention_2"):
        load_config(None, ["model.attn_implementation=flash"])
    assert load_config(None, ["train.arm=padding"]).train.arm == "padding"
    # A schedule shorter than max_steps is refused at load (below an epoch count only the prepared rows tell:
    # raypack.train.plan.run_plan, tests/test_plan.py); one as long, or longer, is not.
    with pytest.raises(ConfigError, match="train.schedule_steps=5 is shorter than train.max_steps=10"):
        load_config(None, ["train.schedule_steps=5", "train.max_steps=10"])
    for schedule in (10, 11, 0):
        assert load_config(None, [f"train.schedule_steps={schedule}", "train.max_steps=10"]).train.max_steps == 10


# Every key naming a place raypack writes to; each is written with file operations, so none takes a URI.
OUTPUT_KEYS = ["output_dir", "prepare.output_dir", "synth.out", "eval.out", "probe.out", "study.out", "sweep.out"]


@pytest.mark.parametrize("uri", ["s3://bucket/out", "gs://bucket/out", "file:///tmp/out", "s3:bucket/out"])
@pytest.mark.parametrize("key", OUTPUT_KEYS)
def test_an_output_key_refuses_a_uri_and_takes_a_path(key, uri, tmp_path):
    """A URI where raypack writes with file operations would become a folder named 's3:' in every process's
    working directory: refused at load, naming the key and where checkpoints may go instead. Negative control: the
    same key takes a filesystem path (absolute, relative, or a folder whose name has a colon, written ./)."""
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{key}={uri}"])
    message = str(err.value)
    assert message.startswith(f"{key} {uri!r} is a URI") and "filesystem path" in message, message
    assert "train.storage_path" in message and "\n" not in message
    section, _, name = key.rpartition(".")
    for path in (str(tmp_path / "out"), "out/x", "./s3:bucket"):
        cfg = load_config(None, [f"{key}={path}"])
        assert getattr(getattr(cfg, section) if section else cfg, name) == path


INPUT_KEYS = ["data.tokenizer", "data.hf_root", "pack.embedding_model", "model.name_or_path", "train.deepspeed_json",
              "eval.model_dir", "eval.val_dir", "plan.mfu_from"]


@pytest.mark.parametrize("key", INPUT_KEYS)
def test_an_input_key_refuses_a_uri_and_takes_a_path_or_a_hub_id(key, tmp_path):
    """raypack reads these with file operations or transformers, never pyarrow.fs: a URI would fail late, in every
    worker, as a malformed hub id. Refused at load, naming the key. Negative control: a path, and for the model
    keys a hub id, load."""
    for uri in ("s3://bucket/model", "gs://bucket/x", "s3:bucket/x"):
        with pytest.raises(ConfigError) as err:
            load_config(None, [f"{key}={uri}"])
        message = str(err.value)
        assert message.startswith(f"{key} {uri!r} is a URI") and "filesystem path" in message, message
        assert "\n" not in message
    section, name = key.split(".")
    takes = [str(tmp_path / "x"), "out/x"] + (["meta-llama/Llama-3.2-1B"] if "model" in key or key ==
                                                 "data.tokenizer" else [])
    model = [f"model.name_or_path={tmp_path / 'model'}"] if key == "data.tokenizer" else []  # tiny needs tiny
    for value in takes:
        assert getattr(getattr(load_config(None, [*model, f"{key}={value}"]), section), name) == value


def test_every_output_key_is_checked_and_the_uri_keys_still_take_uris():
    """The keys named out / output_dir are all in OUTPUT_KEYS (a new one joins the test above); train.storage_path
    (checkpoints through pyarrow.fs), data.sources and tracking.uri keep taking URIs."""
    keys = [line.split()[0] for line in describe_fields() if line.startswith("  ")]
    assert sorted(k for k in keys if k.rpartition(".")[2] in ("out", "output_dir")) == sorted(OUTPUT_KEYS)
    cfg = load_config(None, ["train.storage_path=s3://bucket/runs", "data.sources=[s3://bucket/rows.jsonl]",
                             "tracking.uri=http://mlflow.internal:5000"])
    assert cfg.train.storage_path == "s3://bucket/runs" and cfg.data.sources == ["s3://bucket/rows.jsonl"]


def test_config_names_are_what_the_data_modules_implement():
    """config.py declares the names a config may use and imports no data/ module; the modules behind the names
    implement exactly those (a synth preset added without its config name would be unreachable)."""
    import ast
    import importlib.util

    from raypack import config
    from raypack.data import synth

    assert tuple(synth.PRESETS) == config.SYNTH_PRESETS and synth.TASKS == config.SYNTH_TASKS
    tree = ast.parse(open(importlib.util.find_spec("raypack.config").origin).read())
    modules = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    modules += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in modules if m.startswith("raypack.")], modules


def test_the_examples_in_config_and_resume_hold():
    """The literal examples in raypack/config.py (is_uri, setting_configs) and raypack/train/resume.py."""
    import doctest

    import raypack.config
    import raypack.train.resume

    for module in (raypack.config, raypack.train.resume):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0, module.__name__
