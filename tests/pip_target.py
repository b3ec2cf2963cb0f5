"""Install packages into a throw-away folder (`pip install --target`), never into the test environment itself."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pip_target(target: Path, *args: str, timeout: float = 600) -> Path:
    """`pip install --no-deps --target target *args` with this interpreter's pip; raises with pip's output.
    --no-compile: the folder is imported from once, so byte-compiling every module of a large package (ray, for
    verl) up front would cost more than the few modules the check imports."""
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
           "--no-compile", "--target", str(target), *args]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{run.stdout}\n{run.stderr}")
    return target


def run_python(code: str, path: list[Path], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter whose imports come from `path` first (and not from the clone's root)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(p) for p in path), PYTHONNOUSERSITE="1")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=env)


def build_wheel(directory: Path) -> Path:
    """`pip wheel --no-deps` of a copy of the clone (building in place would leave build/ and egg-info behind)."""
    source = directory / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "build", "*.egg-info",
                                                                 "__pycache__", ".pytest_cache"))
    cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w",
           str(directory), str(source)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{run.stdout}\n{run.stderr}")
    (path,) = directory.glob("twofold-*.whl")
    return path
