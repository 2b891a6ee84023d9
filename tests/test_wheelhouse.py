"""scripts/wheelhouse.py's own logic, without the network: the host list, the constraints, Ray's repack, the split.

    .venv/bin/python -m pytest -q tests/test_wheelhouse.py

The downloads and the install on the target Python are checked by running the script
(docs/cluster.md, "Offline install"), not here: the suite has no network.
"""

import base64
import hashlib
import importlib.util
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("wheelhouse", ROOT / "scripts" / "wheelhouse.py")
wheelhouse = importlib.util.module_from_spec(spec)
spec.loader.exec_module(wheelhouse)


def test_host_list_holds_torch_and_none_of_what_the_bundle_brings():
    host = wheelhouse.read_host(ROOT / "scripts" / "gpu-host-packages.txt")
    assert host["torch"] == "2.11.0" and host["transformers"] == "5.17.0" and host["huggingface-hub"] == "1.33.0"
    assert "pyarrow" in host and host["pyarrow"] is None
    # ../shared/gpu-host.md's "absent" row: the bundle must bring these, so they must not be in the list.
    for absent in ("ray", "deepspeed", "lm-eval", "datasets", "evaluate", "mlflow", "pydantic", "jsonschema",
                   "tensorboardx", "hjson"):
        assert absent not in host


def test_read_host_refuses_a_range(tmp_path):
    bad = tmp_path / "host.txt"
    bad.write_text("torch>=2.0\n")
    with pytest.raises(ValueError, match="name==version"):
        wheelhouse.read_host(bad)


def test_constraints_take_the_host_pins_over_the_project_pins(tmp_path):
    project = tmp_path / "constraints.txt"
    project.write_text("torch==2.13.0\nray==2.60.0\nPyYAML==6.0.4\n")
    lines = wheelhouse.constraints_for({"torch": "2.11.0", "pyyaml": None}, project)
    assert lines == ["torch==2.11.0", "ray==2.60.0"]  # the project's torch and the host's pyyaml are not pinned
    assert wheelhouse.pinned("ray[data,train,tune]", lines) == "ray[data,train,tune]==2.60.0"
    assert wheelhouse.pinned("tensorboardX", lines) == "tensorboardX"


def fake_wheel(path: Path, files: dict[str, bytes]) -> Path:
    """A wheel with a RECORD listing every file and its hash, as pip writes them."""
    record = "ray-2.60.0.dist-info/RECORD"
    lines = []
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            lines.append(f"{name},sha256={digest},{len(data)}")
        lines.append(f"{record},,")
        z.writestr(record, "\n".join(lines) + "\n")
    return path


def test_ray_repack_drops_the_jar_and_keeps_record_true(tmp_path):
    files = {"ray/__init__.py": b"x = 1\n", "ray/jars/ray_dist.jar": b"\0" * 5000,
             "ray/core/src/ray/raylet/raylet": b"\x7fELF" * 100,
             # Ray vendors packages with their own RECORD: not the wheel's (read the wrong one: 'not in RECORD')
             "ray/thirdparty_files/aiohttp-3.9.dist-info/RECORD": b"aiohttp/__init__.py,,\n"}
    src = fake_wheel(tmp_path / "ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl", files)
    assert wheelhouse.record_matches(src) == []
    out = tmp_path / "out.whl"
    dropped = wheelhouse.strip_wheel(src, out, wheelhouse.RAY_DROPS)
    assert [d["path"] for d in dropped] == ["ray/jars/ray_dist.jar"] and dropped[0]["size"] == 5000
    with zipfile.ZipFile(out) as z:
        assert "ray/jars/ray_dist.jar" not in z.namelist()
        assert z.read("ray/core/src/ray/raylet/raylet") == files["ray/core/src/ray/raylet/raylet"]
    assert wheelhouse.record_matches(out) == []
    # Negative control: dropping the file without rewriting RECORD is caught by the same check.
    naive = tmp_path / "naive.whl"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(naive, "w") as zout:
        for info in zin.infolist():
            if not info.filename.startswith("ray/jars/"):
                zout.writestr(info, zin.read(info.filename))
    assert wheelhouse.record_matches(naive) == ["ray/jars/ray_dist.jar: in RECORD, not in the wheel"]


def test_one_bundle_when_it_fits_else_one_per_group(tmp_path):
    def wheel(name, size):
        path = tmp_path / name
        path.write_bytes(b"\0" * size)
        return path

    groups = {"train": {"ray": wheel("ray.whl", 600), "pydantic": wheel("pydantic.whl", 100)},
              "eval": {"lm-eval": wheel("lm_eval.whl", 300), "pydantic": tmp_path / "pydantic.whl"}}
    assert list(wheelhouse.plan_bundles(groups, 1000)) == ["all"]  # 600 + 100 + 300: pydantic counted once
    assert len(wheelhouse.plan_bundles(groups, 1000)["all"]) == 3
    split = wheelhouse.plan_bundles(groups, 999)
    assert {k: len(v) for k, v in split.items()} == {"train": 2, "eval": 2}


def test_platform_tags_reach_down_to_manylinux2014():
    """pip takes only the tags it is given: Ray's wheels are manylinux2014, torch's manylinux_2_28."""
    tags = wheelhouse.platform_tags("manylinux_2_28_x86_64")
    assert tags[0] == "manylinux_2_28_x86_64" and tags[-1] == "manylinux2014_x86_64" and len(tags) == 13
    assert wheelhouse.platform_tags("macosx_14_0_arm64") == ["macosx_14_0_arm64"]
