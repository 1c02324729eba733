"""The `llama-server` peer, built once from the package registry into a cache directory.

Owns the build: `pip download --no-binary :all: --no-deps llama-cpp-python==VERSION` (the sdist
vendors llama.cpp), then `cmake --build --target llama-server` with the host CPU's native flags,
at a low priority, into `<cache>/llama-server/<VERSION>-<cpu key>/llama-server`. The key holds a
hash of the CPU's flags because a native build may use instructions another host lacks (a shared
home directory must never hand an AVX-512 binary to an AVX2 machine). Never downloads a binary and
never reaches anything but the package index; never starts the server (the targets module does).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
BUILD_NICENESS = 10  # a build of minutes on a small shared machine must yield to everything else
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DBUILD_SHARED_LIBS=OFF",  # one self-contained file in the cache, no rpath to keep valid
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # its default fetches the web UI from the network at build time
)

Log = Callable[[str], None]


class BuildError(RuntimeError):
    """The sdist could not be downloaded or llama-server did not build."""


def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def needs_no_repack(flags: frozenset[str] | None = None) -> bool:
    """llama.cpp's AMX weight repacking crashes on some Intel guests; only AMX hosts need it off."""
    return any(flag.startswith("amx") for flag in (cpu_flags() if flags is None else flags))


def cache_key(version: str = LLAMA_CPP_PYTHON_VERSION, flags: frozenset[str] | None = None) -> str:
    flags = cpu_flags() if flags is None else flags
    digest = hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:12]
    return f"{version}-{os.uname().machine}-{digest}"


def binary_path(cache_dir: Path, version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    return cache_dir / "llama-server" / cache_key(version) / "llama-server"


def _nice() -> None:
    os.nice(BUILD_NICENESS)


def _run(cmd: list[str], cwd: Path, log_file: Path, log: Log) -> None:
    log(f"llama-server build: {' '.join(cmd)}")
    with log_file.open("ab") as out:
        done = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_nice, check=False)
    if done.returncode != 0:
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-25:])
        raise BuildError(f"{cmd[0]} {cmd[1]} failed with {done.returncode}:\n{tail}")


def _extract_sdist(download_dir: Path, work: Path) -> Path:
    [sdist] = download_dir.glob("llama_cpp_python-*.tar.gz")
    with tarfile.open(sdist) as tar:
        tar.extractall(work, filter="data")  # the data filter refuses links and paths out of `work`
    [source] = work.glob("llama_cpp_python-*/vendor/llama.cpp")
    return source


def build(cache_dir: Path, log: Log, version: str = LLAMA_CPP_PYTHON_VERSION, jobs: int | None = None) -> Path:
    """Download the sdist, build `llama-server`, install it into the cache; returns its path."""
    target = binary_path(cache_dir, version)
    target.parent.mkdir(parents=True, exist_ok=True)
    log_file = target.parent / "build.log"
    log_file.write_bytes(b"")
    jobs = jobs or os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="loom-llama-build-") as tmp:
        work = Path(tmp)
        download = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps"]
        _run([*download, f"llama-cpp-python=={version}", "-d", str(work / "sdist")], work, log_file, log)
        source = _extract_sdist(work / "sdist", work)
        _run(["cmake", "-S", str(source), "-B", str(work / "build"), *CMAKE_OPTIONS], work, log_file, log)
        _run(
            ["cmake", "--build", str(work / "build"), "--target", "llama-server", "-j", str(jobs)], work, log_file, log
        )
        built = work / "build" / "bin" / "llama-server"
        if not built.is_file():
            raise BuildError(f"the build finished without {built}")
        staged = target.with_suffix(".tmp")
        shutil.copy2(built, staged)
        staged.replace(target)  # atomic: a half-copied binary is never found in the cache
    log(f"llama-server build: installed {target} (log: {log_file})")
    return target


def ensure(cache_dir: Path, log: Log, version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """The cached binary, building it first when it is not there (about 4 minutes on 2 cores)."""
    target = binary_path(cache_dir, version)
    if target.is_file():
        return target
    log(f"llama-server: no cached build at {target}; building llama-cpp-python=={version}'s llama.cpp")
    return build(cache_dir, log, version)


def default_cache_dir() -> Path:
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("loom"))


if __name__ == "__main__":
    print(ensure(default_cache_dir(), lambda line: print(line, flush=True)))
