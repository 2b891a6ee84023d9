"""Hugging Face dataset repositories as lists of data files: `hf:ORG/NAME[/CONFIG][@REVISION]` sources.

The driver only resolves a source into the repository's data files for one split
(`resolve`); each file is then fetched and read by its own read task
(`fetch`, called by raypack.data.pipeline's read tasks), never loaded on the driver.
Which files make a split follows the hub's conventions, as `datasets` applies them:

1. the `configs:` section of the dataset card (README.md's YAML front matter):
   the chosen config's `data_files` (a pattern, a list, or `{split, path}` entries)
   under its `data_dir`;
2. else sharded files `data/{split}-00000-of-00002.parquet`;
3. else a split keyword in a folder name (`train/`, `data/dev/`, ...),
4. else in a file name (`train.jsonl`, `my-test-00.json`, ...);
5. else every file is the train split.

    >>> split_files(["README.md", "data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet",
    ...              "data/test-00000-of-00001.parquet"], {}, "train")
    (['data/train-00000-of-00002.parquet', 'data/train-00001-of-00002.parquet'], [])

A remote source is pinned to the commit its revision (or the default branch)
resolves to, so every read task reads the same commit and the tokenized cache's
hash changes when the dataset does. `data.hf_root` maps `hf:ORG/NAME` to the local
folder `<hf_root>/ORG/NAME` laid out like a hub repository (a mirror, or tests).
Imports no ray; huggingface_hub only when a source is remote.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote, unquote

import yaml

from raypack.data.formats import EXTENSIONS

SYNTAX = "hf:ORG/NAME[/CONFIG][@REVISION]"
URI_PREFIX = "hf://datasets/"
# What datasets never takes as data (datasets.data_files.FILES_TO_IGNORE), besides hidden and __special__ paths.
NOT_DATA = ("README.md", "config.json", "dataset_info.json", "dataset_infos.json", "dummy_data.zip",
            "dataset_dict.json")
SHARDED = "data/{split}-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9]*.*"
SPLIT_KEYWORDS = {"train": ("train", "training"), "validation": ("validation", "valid", "dev", "val"),
                  "test": ("test", "testing", "eval", "evaluation")}
_SEP = "-._ 0-9"
IN_DIR_NAME = ("**/{k}/**", "**/{k}[{s}]*/**", "**/*[{s}]{k}/**", "**/*[{s}]{k}[{s}]*/**")
IN_FILE_NAME = ("**/{k}[{s}]*", "**/*[{s}]{k}[{s}]*")
MAX_LISTED = 12


class HubSource(NamedTuple):
    repo_id: str
    config: str | None
    revision: str | None


class HubFiles(NamedTuple):
    """One `hf:` source resolved: its split's data files at one revision."""

    source: str
    repo_id: str
    revision: str  # the commit sha (remote), or the given @REVISION / "local" (data.hf_root)
    files: list[str]  # repository paths, in read order
    skipped: list[str]  # files of the split raypack cannot read (not .json/.jsonl/.parquet)
    fingerprint: list  # what identifies the data for the tokenized cache's hash

    @property
    def uris(self) -> list[str]:
        """What a read task is given per file: hf://datasets/ORG/NAME@REVISION/PATH."""
        return [f"{URI_PREFIX}{self.repo_id}@{quote(self.revision, safe='')}/{f}" for f in self.files]


def parse_source(source: str) -> HubSource:
    """`hf:ORG/NAME[/CONFIG][@REVISION]` -> its parts; a revision may hold slashes (refs/pr/1)."""
    spec, at, revision = source.removeprefix("hf:").partition("@")
    parts = spec.split("/")
    if not source.startswith("hf:") or len(parts) not in (2, 3) or not all(parts) or (at and not revision):
        raise ValueError(f"data.sources: {source!r} is not {SYNTAX} (e.g. hf:Super-shuhe/packing-tulu@main)")
    return HubSource("/".join(parts[:2]), parts[2] if len(parts) == 3 else None, revision or None)


def resolve(source: str, split: str, hf_root: str = "") -> HubFiles:
    """The split's data files of an hf: source: listed under data.hf_root, or on the hub at a pinned commit."""
    repo_id, config, revision = parse_source(source)
    if hf_root:
        folder = Path(hf_root) / repo_id
        if not folder.is_dir():
            raise ValueError(f"data.sources: {source}: no folder {folder} (data.hf_root maps hf:ORG/NAME to "
                             "<hf_root>/ORG/NAME); fix the id or data.hf_root")
        files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        readme = folder / "README.md"
        card = card_yaml(readme.read_text(encoding="utf-8")) if readme.is_file() else {}
        chosen, skipped = split_files(files, card, split, config, source)
        stats = [[f, (folder / f).stat().st_size, (folder / f).stat().st_mtime_ns] for f in ["README.md", *chosen]
                 if (folder / f).is_file()]
        return HubFiles(source, repo_id, revision or "local", chosen, skipped,
                        ["hf", repo_id, config, revision, split, str(folder.resolve()), stats])
    sha, files, card = _list_remote(source, repo_id, revision)
    chosen, skipped = split_files(files, card, split, config, source)
    return HubFiles(source, repo_id, sha, chosen, skipped, ["hf", repo_id, config, sha, split, chosen])


class HubUnreachable(ValueError):
    """The hub could not be asked for an hf: dataset's revision and files (no network, offline mode)."""


def _list_remote(source: str, repo_id: str, revision: str | None) -> tuple[str, list[str], dict]:
    """The commit the revision resolves to, the repository's files and its card there (HF_ENDPOINT, HF_TOKEN)."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.utils import RepositoryNotFoundError, RevisionNotFoundError

    api = HfApi()
    try:
        sha = api.dataset_info(repo_id, revision=revision).sha
    except RevisionNotFoundError:
        raise ValueError(f"data.sources: {source}: the dataset has no revision {revision!r}; give a branch, "
                         "tag or commit after @") from None
    except RepositoryNotFoundError:
        raise ValueError(f"data.sources: {source}: no dataset repository {repo_id!r} on the hub (or no access: "
                         "set HF_TOKEN on every node for a private or gated one)") from None
    except Exception as err:  # noqa: BLE001  (no network, DNS, proxy, HF_HUB_OFFLINE: the hub cannot be asked)
        raise HubUnreachable(f"data.sources: {source}: the hub could not be reached to pin the dataset's revision "
                             f"({type(err).__name__}: {str(err)[:200]}); prepare needs it (or a mirror: "
                             "data.hf_root, HF_ENDPOINT)") from None
    files = sorted(api.list_repo_files(repo_id, repo_type="dataset", revision=sha))
    card = {}
    if "README.md" in files:
        readme = hf_hub_download(repo_id, "README.md", repo_type="dataset", revision=sha)
        card = card_yaml(Path(readme).read_text(encoding="utf-8"))
    return sha, files, card


def fetch(uri: str, hf_root: str = "") -> str:
    """A local path to read for hf://datasets/ORG/NAME@REVISION/PATH: under data.hf_root, or downloaded into
    this node's Hugging Face cache (once per node and commit). Called in the read task, not on the driver."""
    repo_id, revision, path = parse_uri(uri)
    if hf_root:
        return str(Path(hf_root) / repo_id / path)
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo_id, path, repo_type="dataset", revision=revision)


def parse_uri(uri: str) -> tuple[str, str, str]:
    """hf://datasets/ORG/NAME@REVISION/PATH -> (repo id, revision, path in the repository)."""
    org, name_rev, path = uri.removeprefix(URI_PREFIX).split("/", 2)
    name, _, revision = name_rev.partition("@")
    return f"{org}/{name}", unquote(revision), path


def card_yaml(readme: str) -> dict:
    """The YAML front matter of a dataset card (README.md), or {} without one."""
    match = re.match(r"\A\ufeff?---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|\Z)", readme, re.S)
    data = yaml.safe_load(match.group(1)) if match else None
    return data if isinstance(data, dict) else {}


# ---------------------------------------------------------------- which files make a split


def split_files(files: list[str], card: dict, split: str, config: str | None = None,
                source: str = "hf:ORG/NAME") -> tuple[list[str], list[str]]:
    """(readable data files of the split, in read order; the split's files raypack cannot read), by the hub's
    conventions (module docstring); no file for the split is a one-line ValueError naming the files found."""
    data = [f for f in files if not _hidden(f) and f.rpartition("/")[2] not in NOT_DATA]
    configs = card.get("configs") or []
    if configs:
        entry = _config_entry(configs, config, source)
        base = entry.get("data_dir", "").strip("/")
        under = [f[len(base) + 1:] for f in data if f.startswith(base + "/")] if base else data
        by_split = _data_files(entry["data_files"]) if "data_files" in entry else _inferred(under)
    else:
        if config:
            raise ValueError(f"data.sources: {source}: the dataset card has no configs: section, so no config "
                             f"{config!r}; drop /{config}")
        base, under, by_split = "", data, _inferred(data)
    matched = []
    for pattern in by_split.get(split, []):
        regex = glob_regex(pattern)
        matched += [f for f in under if regex.match(f) and f not in matched]
    matched = [f"{base}/{f}" if base else f for f in matched]
    readable = [f for f in matched if os.path.splitext(f)[1].lower() in EXTENSIONS]
    if not readable:
        raise ValueError(f"data.sources: {source}: no {'/'.join(EXTENSIONS)} data files for split {split!r} "
                         f"(data.hf_split); splits found: {sorted(by_split) or 'none'}; {_listed(matched or data)}")
    return readable, [f for f in matched if f not in readable]


def _listed(files: list[str]) -> str:
    shown = ", ".join(files[:MAX_LISTED]) or "none"
    more = f" and {len(files) - MAX_LISTED} more" if len(files) > MAX_LISTED else ""
    return f"files: {shown}{more}"


def _hidden(path: str) -> bool:
    return any(part.startswith((".", "__")) for part in path.split("/"))


def _config_entry(configs: list[dict], name: str | None, source: str) -> dict:
    """The card config named in the source, else the one marked default (or named default), else the only one."""
    names = [c.get("config_name", "default") for c in configs]
    if name is not None:
        if name not in names:
            raise ValueError(f"data.sources: {source}: no config {name!r}; the dataset card has {names}")
        return configs[names.index(name)]
    defaults = [c for c, n in zip(configs, names) if c.get("default")] or [
        c for c, n in zip(configs, names) if n == "default"]
    if defaults or len(configs) == 1:
        return (defaults or configs)[0]
    spec, at, revision = source.partition("@")
    raise ValueError(f"data.sources: {source}: the dataset card has configs {names} and none is the default; "
                     f"name one, e.g. {spec}/{names[0]}{at}{revision}")


def _data_files(value) -> dict[str, list[str]]:
    """A config's data_files (a pattern, a list of them, {split, path} entries, or a mapping) by split."""
    if isinstance(value, str):
        return {"train": [value]}
    if isinstance(value, dict):
        return {str(k): v if isinstance(v, list) else [v] for k, v in value.items()}
    if value and all(isinstance(v, dict) for v in value):
        return {str(v["split"]): v["path"] if isinstance(v["path"], list) else [v["path"]] for v in value}
    return {"train": list(value)}


def _inferred(files: list[str]) -> dict[str, list[str]]:
    """Split patterns from file names alone: sharded data/ files, then split keywords in folder names, then in
    file names, then everything as train (datasets.data_files' order: the first that finds files wins)."""
    sharded = glob_regex(SHARDED.replace("{split}", "*"))
    names = [m.group(1) for f in files if sharded.match(f) and (m := re.match(r"data/(.+?)-\d{5}-of-", f))]
    if names:
        return {name: [SHARDED.format(split=name)] for name in dict.fromkeys(names)}
    for bases in (IN_DIR_NAME, IN_FILE_NAME):
        patterns = {split: [b.format(k=k, s=_SEP) for k in keywords for b in bases]
                    for split, keywords in SPLIT_KEYWORDS.items()}
        found = {split: p for split, p in patterns.items() if any(glob_regex(x).match(f) for x in p for f in files)}
        if found:
            return found
    return {"train": ["**"]} if files else {}


def glob_regex(pattern: str) -> re.Pattern:
    """fsspec's glob as the hub uses it: `*` and `?` stay within a folder, `**` crosses folders, [...] a class.

    >>> bool(glob_regex("**/train[-._ 0-9]*").match("data/train-00.jsonl"))
    True
    >>> bool(glob_regex("*.json").match("a/b.json"))
    False
    """
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] in "*?":
            out.append("[^/]*" if pattern[i] == "*" else "[^/]")
            i += 1
        elif pattern[i] == "[" and (end := pattern.find("]", i + 2)) > 0:
            body = pattern[i + 1:end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")
