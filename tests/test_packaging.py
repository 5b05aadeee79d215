"""The wheel maps callbacks/ and strategies/ into the kvtrain package and installs no top-level module
of those names; the running (editable, in CI) install does the same."""

import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO

MAPPED = {"callbacks": "kvtrain/callbacks", "strategies": "kvtrain/strategies", "recipes": "kvtrain/recipes"}
IMPORT_CHECK = (
    "import importlib.util as u, kvtrain.callbacks as c, kvtrain.strategies as s; "
    "print(c.__file__); print(s.__file__); print(u.find_spec('callbacks'), u.find_spec('strategies'))"
)


def source_files(folder: str, suffixes=(".py", ".yaml")) -> set[str]:
    return {p.relative_to(REPO / folder).as_posix() for p in (REPO / folder).rglob("*") if p.suffix in suffixes
            and "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    shutil.copytree(REPO, src, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "build", "dist", "*.egg-info", "__pycache__", "lightning_logs"))
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)]
    subprocess.run(cmd, check=True, capture_output=True)
    return next(out.glob("kvtrain-*.whl"))


@pytest.mark.slow
def test_wheel_contents(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, target in MAPPED.items():
        for rel in source_files(folder):
            assert f"{target}/{rel}" in names, f"{folder}/{rel} is missing from the wheel"
    for init in (REPO / "kvtrain").rglob("__init__.py"):
        assert init.relative_to(REPO).as_posix() in names, f"package {init.parent} is missing from the wheel"
    top_level = {n.split("/")[0] for n in names}
    assert not top_level & {"callbacks", "strategies", "recipes", "tests", "bench", "notebooks"}, top_level
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "kvtrain = kvtrain.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.mark.slow
def test_installed_wheel_imports_mapped_subpackages(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    out = subprocess.run([sys.executable, "-c", IMPORT_CHECK], cwd=tmp_path, env={"PYTHONPATH": str(target)},
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == str(target / "kvtrain" / "callbacks" / "__init__.py")
    assert out[1] == str(target / "kvtrain" / "strategies" / "__init__.py")
    assert out[2] == "None None"


def test_running_install_maps_subpackages(tmp_path):
    """Holds for the environment the tests run in (an editable install in CI and the README)."""
    out = subprocess.run([sys.executable, "-c", IMPORT_CHECK], cwd=tmp_path, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0].endswith("callbacks/__init__.py") and out[1].endswith("strategies/__init__.py")
    assert out[2] == "None None", "a top-level `callbacks` or `strategies` module is importable"
