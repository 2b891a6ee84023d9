"""Wheelhouse: the wheels raypack's train and eval path need on an offline image that already has torch.

Run on a machine with access to the package index, with an interpreter that has pip >= 24 (metadata-only
resolves); the bundle then travels with the
repository to the offline host (../shared/gpu-host.md: Python 3.12, torch 2.11, 64 MiB per command including
the repository):

    python3 -m venv /tmp/wh && /tmp/wh/bin/pip install -U pip     # once, if .venv's pip is older

    /tmp/wh/bin/python scripts/wheelhouse.py --out out/wheelhouse             # Python 3.12, manylinux x86_64
    /tmp/wh/bin/python scripts/wheelhouse.py --out out/wh311 --python-version 3.11   # the same for a 3.11 image
    /tmp/wh/bin/python scripts/wheelhouse.py --verify /path/to/python3.12     # + install and import check

and on the host, from the repository root:

    python3 -m pip install --no-index --no-deps --target /tmp/rp out/wheelhouse/all/*.whl
    PYTHONPATH=$PWD:/tmp/rp python3 -m raypack.cli --help

What it does, in order:
1. reads the host's package list (--host-packages, default scripts/gpu-host-packages.txt: one distribution a
   line, `name==version` where the version is known): those are left out of the bundle, and the pinned ones
   are what everything else is resolved against, so nothing in the bundle asks for another torch;
2. builds what ships only as an sdist (SDIST_ONLY) into pure-Python wheels here: DeepSpeed with DS_BUILD_OPS=0
   (no op compiled; the host JIT-builds one if ever asked, and raypack asks none: torch's AdamW, no fused ops),
   and three small dependencies of lm-eval; the resolver finds them with --find-links;
3. resolves the train path (ray[data,train,tune] without Ray's dashboard extras, DeepSpeed,
   tensorboardX) and the eval path (lm-eval) for the target Python and platform with pip's resolver
   (`pip install --dry-run --report`, binary wheels only; it reads metadata alone where the index serves it,
   else it downloads each wheel it considers and keeps none: torch and its CUDA libraries, ~3.5 GB, seconds here),
   pinned by constraints.txt for whatever the host lacks;
4. downloads the wheels the host lacks (`pip download --no-deps --only-binary=:all:`);
5. repacks Ray's wheel without what a Python-only Ray never loads (RAY_DROPS, each with its reason) and
   RECORD rewritten to match, since Ray's wheel alone is larger than the upload;
6. writes the bundle: one folder `all/` if train and eval fit the budget together, else `train/` and `eval/`,
   each enough for its own command; prints each bundle's size and exits 1 if one is over --budget-mib
   (default: 64 MiB less this repository's tracked and untracked, not ignored, files: what travels with it);
7. with --verify PYTHON: installs each bundle into a fresh folder with that interpreter
   (`pip install --no-index --no-deps --target`) and runs scripts/wheelhouse_check.py there.

raypack itself is not in the bundle: the repository travels as the working tree, so it runs from PYTHONPATH.
A summary (every wheel, its size, what was dropped from Ray's) is written to <out>/wheelhouse.json.
"""

from __future__ import annotations

import argparse
import base64
import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from urllib.parse import unquote, urlparse

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
MIN_PIP = (24, 0)  # metadata-only resolves (check_pip)
UPLOAD_MIB = 64  # what the host takes per command, the repository included (../shared/gpu-host.md)
# The train path: Ray without its "default" extra (the dashboard's aiohttp-cors, opencensus, py-spy, ...: a local
# Ray starts without them, raypack never opens the dashboard), DeepSpeed (built here, step 2), tensorboardX
# (raypack.train.loop writes TensorBoard event files). MLflow is left out: tracking.enabled=false imports none of it.
TRAIN = ["ray[data,train,tune]", "deepspeed", "tensorboardX"]
EVAL = ["lm-eval"]
# On the index only as source: built here into wheels (all pure Python; a built wheel that is not is refused).
SDIST_ONLY = ["deepspeed", "rouge-score", "sqlitedict", "word2number"]
# Files of Ray's wheel a Python-only Ray never loads (glob on the path inside the wheel, why).
RAY_DROPS = [
    ("ray/jars/*", ("the Java worker's jar (ray_dist.jar): loaded only by a JVM, which Ray starts only for Java "
                    "workers or cross-language calls; raypack's Ray is Python-only")),
    ("ray/dashboard/client/build/*", ("the dashboard's web page (JavaScript, CSS, a source map), read only by the "
                                      "dashboard head's HTTP server (ray/dashboard/http_server_head.py), which Ray "
                                      "starts only where its `default` extras import: never with this bundle, "
                                      "which leaves them out")),
]


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them.

    >>> normalize("Huggingface_Hub"), normalize("ray[data,train]")
    ('huggingface-hub', 'ray')
    """
    return re.sub(r"[-_.]+", "-", re.split(r"[\[<>=!~; ]", name.strip(), maxsplit=1)[0]).lower()


def read_host(path: Path) -> dict[str, str | None]:
    """{normalized name: pinned version or None} from a host package list ('#' comments, name or name==version)."""
    host = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, version = line.partition("==")
        if re.search(r"[<>!~ ]", name) or (version and not re.fullmatch(r"[\w.+!-]+", version)):
            raise ValueError(f"{path}: {line!r}: write a distribution name or name==version, one a line")
        host[normalize(name)] = version or None
    return host


def constraints_for(host: dict[str, str | None], project_constraints: Path) -> list[str]:
    """The host's pins, then the project's pins (constraints.txt) for what the host does not have."""
    lines = [f"{name}=={version}" for name, version in sorted(host.items()) if version]
    for line in project_constraints.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and normalize(line) not in host:
            lines.append(line)
    return lines


def pinned(requirement: str, constraints: list[str]) -> str:
    """`requirement` at the version constraints.txt pins (the same release the .venv tests), when it pins one."""
    for line in constraints:
        if normalize(line) == normalize(requirement) and "==" in line:
            return requirement + "==" + line.split("==", 1)[1]
    return requirement


def platform_tags(platform: str) -> list[str]:
    """`platform` and every older manylinux tag the same machine runs (pip takes only the tags it is given).

    >>> platform_tags("manylinux_2_19_x86_64")
    ['manylinux_2_19_x86_64', 'manylinux_2_18_x86_64', 'manylinux_2_17_x86_64', 'manylinux2014_x86_64']
    """
    match = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", platform)
    if not match:
        return [platform]
    glibc, arch = int(match.group(1)), match.group(2)
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(glibc, 16, -1)]
    return tags + ([f"manylinux2014_{arch}"] if glibc >= 17 else [])


def target_flags(python_version: str, platform: str) -> list[str]:
    flags = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp"]
    for tag in platform_tags(platform):
        flags += ["--platform", tag]
    return flags


def pip(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("+ pip " + " ".join(args), file=sys.stderr, flush=True)
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], check=True, **kwargs)


def build_sdist(requirement: str, dest: Path) -> Path:
    """A package the index has only as source, built into a pure-Python wheel in `dest` (kept between runs).
    DeepSpeed: DS_BUILD_OPS=0, no op compiled. pip's build isolation: the build environment has no torch, so
    DeepSpeed records none (its torch_info is 0.0, as for any install built without torch) and prebuilds
    nothing; at run time it finds the host's torch and JIT-builds an op only when one is asked for."""
    dest.mkdir(parents=True, exist_ok=True)
    name = normalize(requirement)
    version = requirement.split("==", 1)[1] if "==" in requirement else None
    found = [p for p in dest.glob("*.whl") if normalize(p.name.split("-")[0]) == name
             and (version is None or p.name.split("-")[1] == version)]
    if not found:
        env = {**os.environ, "DS_BUILD_OPS": "0"}
        pip(["wheel", "--no-deps", "--no-cache-dir", "--no-binary", name, "-w", str(dest), requirement], env=env)
        found = [p for p in dest.glob("*.whl") if normalize(p.name.split("-")[0]) == name]
    if len(found) != 1 or not found[0].name.endswith("-py3-none-any.whl"):
        raise SystemExit(f"wheelhouse: expected one pure-Python wheel of {requirement} in {dest}, found {found}")
    return found[0]


def resolve(requirements: list[str], constraints_file: Path, flags: list[str], work: Path) -> dict[str, dict]:
    """{normalized name: {"name", "version"}} of everything pip would install for `requirements` on the target."""
    report = work / f"report-{hashlib.sha1(' '.join(requirements).encode()).hexdigest()[:8]}.json"
    with tempfile.TemporaryDirectory() as target:
        pip(["install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report), "--target", target,
             *flags, "-c", str(constraints_file), *requirements])
    found = {}
    for item in json.loads(report.read_text())["install"]:
        meta = item["metadata"]
        found[normalize(meta["name"])] = {"name": meta["name"], "version": meta["version"],
                                          "url": item["download_info"]["url"]}
    return found


def download(items: dict[str, dict], flags: list[str], dest: Path) -> dict[str, Path]:
    """{name: wheel file} for `items` (name -> version), fetched once into `dest` (a cache kept between runs)."""
    dest.mkdir(parents=True, exist_ok=True)
    missing = [f"{i['name']}=={i['version']}" for n, i in items.items()
               if not wheel_of(dest, n, i["version"]) and not i["url"].startswith("file:")]
    if missing:
        pip(["download", "--no-deps", *flags, "-d", str(dest), *missing])
    # A wheel pip found on this machine (built here, or a local index) is taken where it lies.
    files = {n: Path(unquote(urlparse(i["url"]).path)) if i["url"].startswith("file:") else
             wheel_of(dest, n, i["version"]) for n, i in items.items()}
    lost = [n for n, f in files.items() if f is None]
    if lost:
        raise SystemExit(f"wheelhouse: pip download left no wheel for {lost} in {dest}")
    return files


def wheel_of(folder: Path, name: str, version: str) -> Path | None:
    for path in folder.glob("*.whl"):
        dist, ver = path.name.split("-")[:2]
        if normalize(dist) == name and ver == version:
            return path
    return None


def wheel_record(names: list[str]) -> str:
    """The wheel's own RECORD: <name>-<version>.dist-info/RECORD at the top (Ray vendors packages with their own
    dist-info folders deeper down)."""
    found = [n for n in names if re.fullmatch(r"[^/]+\.dist-info/RECORD", n)]
    if len(found) != 1:
        raise SystemExit(f"wheelhouse: expected one top-level .dist-info/RECORD, found {found}")
    return found[0]


def strip_wheel(src: Path, dest: Path, drops: list[tuple[str, str]]) -> list[dict]:
    """Copy the wheel `src` to `dest` without the files matching `drops` (globs), RECORD rewritten to list exactly
    the files kept; every entry recompressed (deflate, level 9). Returns what was dropped: path, size, reason."""
    dropped = []
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
        names = zin.namelist()
        record = wheel_record(names)
        for info in zin.infolist():
            reason = next((why for pattern, why in drops if fnmatch.fnmatch(info.filename, pattern)), None)
            if reason is not None:
                dropped.append({"path": info.filename, "size": info.file_size, "reason": reason})
            elif info.filename != record:
                zout.writestr(info, zin.read(info.filename), zipfile.ZIP_DEFLATED, 9)
        gone = {d["path"] for d in dropped}
        lines = [line for line in zin.read(record).decode().splitlines()
                 if line and line.rsplit(",", 2)[0] not in gone]
        zout.writestr(zin.getinfo(record), "\n".join(lines) + "\n", zipfile.ZIP_DEFLATED, 9)
    return dropped


def record_matches(wheel: Path) -> list[str]:
    """Mismatches between a wheel's RECORD and its files (hashes and the set of paths); [] when they agree."""
    problems = []
    with zipfile.ZipFile(wheel) as z:
        record = wheel_record(z.namelist())
        listed = {}
        for line in z.read(record).decode().splitlines():
            path, digest, _ = line.rsplit(",", 2)
            listed[path] = digest
        for name in z.namelist():
            if name.endswith("/"):
                continue
            if name not in listed:
                problems.append(f"{name}: not in RECORD")
            elif listed[name]:
                algo, expected = listed[name].split("=", 1)
                actual = base64.urlsafe_b64encode(hashlib.new(algo, z.read(name)).digest()).rstrip(b"=").decode()
                if actual != expected:
                    problems.append(f"{name}: hash differs from RECORD")
        problems += [f"{p}: in RECORD, not in the wheel" for p in set(listed) - set(z.namelist())]
    return problems


def repo_size(root: Path) -> int:
    """Bytes of what travels with a command: tracked and untracked, not ignored, files of the repository."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True, check=True).stdout.decode()
    return sum((root / p).stat().st_size for p in out.split("\0") if p and (root / p).is_file())


def write_bundle(folder: Path, files: list[Path]) -> int:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for f in files:
        shutil.copy2(f, folder / f.name)
    return sum(f.stat().st_size for f in files)


def plan_bundles(groups: dict[str, dict[str, Path]], budget: int) -> dict[str, list[Path]]:
    """One bundle 'all' when every group fits the budget together, else one bundle per group."""
    union = {name: f for files in groups.values() for name, f in files.items()}
    if sum(f.stat().st_size for f in union.values()) <= budget:
        return {"all": sorted(union.values())}
    return {group: sorted(files.values()) for group, files in groups.items()}


def check_pip() -> None:
    """A pip that reads metadata alone where the index serves it (PEP 658/714 files beside each wheel): else
    the resolve downloads, without keeping, every wheel it considers, torch and its CUDA libraries included
    (~3.5 GB; an index without those files, as a proxy may be, costs that with any pip)."""
    import pip as pip_module

    major, minor = (int(x) for x in pip_module.__version__.split(".")[:2])
    if (major, minor) < MIN_PIP:
        raise SystemExit(f"wheelhouse: pip {pip_module.__version__} in {sys.executable} is older than "
                         f"{'.'.join(map(str, MIN_PIP))}; run this script from a virtual environment with a newer "
                         "pip (python3 -m venv V && V/bin/pip install -U pip)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "out" / "wheelhouse"), help="the bundles go here")
    parser.add_argument("--cache", default="", help="downloaded and built wheels, kept between runs; default "
                        "<out>/cache (not part of any bundle)")
    parser.add_argument("--python-version", default="3.12", help="the target's Python, e.g. 3.12")
    parser.add_argument("--platform", default="manylinux_2_28_x86_64",
                        help="the target's platform tag; every older manylinux tag down to manylinux2014 is taken "
                             "too (2_28 is what torch 2.11's own wheel needs, so an image running it has at least "
                             "that glibc)")
    parser.add_argument("--host-packages", default=str(ROOT / "scripts" / "gpu-host-packages.txt"),
                        help="what the target image already has (name or name==version, one a line)")
    parser.add_argument("--budget-mib", type=float, default=0.0,
                        help="largest bundle allowed, MiB; 0: 64 MiB less this repository's size")
    parser.add_argument("--verify", default="", metavar="PYTHON",
                        help="install each bundle into a fresh folder with this interpreter and check it imports")
    args = parser.parse_args(argv)

    check_pip()
    out = Path(args.out).resolve()
    cache = Path(args.cache).resolve() if args.cache else out / "cache"
    work = cache / "work"
    work.mkdir(parents=True, exist_ok=True)
    host = read_host(Path(args.host_packages))
    constraints = constraints_for(host, ROOT / "constraints.txt")
    constraints_file = work / "constraints.txt"
    constraints_file.write_text("\n".join(constraints) + "\n")
    flags = target_flags(args.python_version, args.platform)
    budget = int(args.budget_mib * MIB) if args.budget_mib else UPLOAD_MIB * MIB - repo_size(ROOT)

    built = cache / "built"
    for name in SDIST_ONLY:
        build_sdist(pinned(name, constraints), built)
    flags += ["--find-links", str(built)]
    wanted = {"train": [pinned(r, constraints) for r in TRAIN], "eval": [pinned(r, constraints) for r in EVAL]}
    groups, summary = {}, {"python_version": args.python_version, "platform": args.platform,
                           "budget_bytes": budget, "groups": {}, "ray_dropped": []}
    for group, requirements in wanted.items():
        resolved = resolve(requirements, constraints_file, flags, work)
        kept = {n: i for n, i in resolved.items() if n not in host}
        files = download(kept, flags, cache / "downloads")
        if "ray" in files:
            stripped = cache / "stripped" / files["ray"].name
            stripped.parent.mkdir(parents=True, exist_ok=True)
            summary["ray_dropped"] = strip_wheel(files["ray"], stripped, RAY_DROPS)
            problems = record_matches(stripped)
            if problems:
                raise SystemExit(f"wheelhouse: Ray's repacked wheel disagrees with its RECORD: {problems[:5]}")
            summary["ray_original_bytes"] = files["ray"].stat().st_size
            files["ray"] = stripped
        groups[group] = files
        summary["groups"][group] = {"left_out_as_on_host": sorted(f"{i['name']}=={i['version']}"
                                                                  for n, i in resolved.items() if n in host),
                                    "wheels": {f.name: f.stat().st_size for f in sorted(files.values())}}
    bundles = plan_bundles(groups, budget)
    for old in ("all", "train", "eval"):
        if old not in bundles and (out / old).exists():
            shutil.rmtree(out / old)
    status, summary["bundles"] = 0, {}
    for name, files in bundles.items():
        size = write_bundle(out / name, files)
        summary["bundles"][name] = {"bytes": size, "num_wheels": len(files)}
        verdict = "within" if size <= budget else "OVER"
        print(f"wheelhouse: {out / name}: {len(files)} wheels, {size / MIB:.1f} MiB ({verdict} the budget of "
              f"{budget / MIB:.1f} MiB)")
        status = status or int(size > budget)
    dropped = sum(d["size"] for d in summary["ray_dropped"])
    print(f"wheelhouse: Ray's wheel {summary.get('ray_original_bytes', 0) / MIB:.1f} MiB before the repack; "
          f"dropped {len(summary['ray_dropped'])} files, {dropped / MIB:.1f} MiB unpacked")
    (out / "wheelhouse.json").write_text(json.dumps(summary, indent=1) + "\n")
    if args.verify:
        for name in bundles:
            status = verify(args.verify, out / name, name) or status
    return status


def verify(python: str, bundle: Path, name: str) -> int:
    """Install `bundle` into a fresh folder with `python` and run scripts/wheelhouse_check.py against it."""
    target = Path(tempfile.mkdtemp(prefix=f"wheelhouse-{name}-"))
    subprocess.run([python, "-m", "pip", "install", "--disable-pip-version-check", "--no-index", "--no-deps",
                    "--quiet", "--target", str(target), *map(str, sorted(bundle.glob("*.whl")))], check=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{target}"}
    checks = {"all": "train,eval"}.get(name, name)
    done = subprocess.run([python, str(ROOT / "scripts" / "wheelhouse_check.py"), "--checks", checks], env=env,
                          check=False)
    print(f"wheelhouse: {name} installed into {target} with {python}: check "
          f"{'passed' if done.returncode == 0 else 'FAILED'} (folder removed)")
    shutil.rmtree(target, ignore_errors=True)  # ~365 MiB unpacked
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
