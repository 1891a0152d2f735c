"""Build llama.cpp's CPU tools from source, once per source version, under bench/.cache/llama.cpp.

The source is the copy of llama.cpp that the ``llama-cpp-python`` sdist on PyPI vendors (its
``vendor/llama.cpp``: CMake project, ``convert_hf_to_gguf.py`` and ``gguf-py``), fetched with
``pip download``, so only PyPI needs to be reachable. The version is pinned, so every run of the
benchmark measures the same llama.cpp; ``LLAMA_CPP_PYTHON_VERSION`` names it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

CACHE = Path(__file__).parent / ".cache" / "llama.cpp"
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
"""llama-cpp-python 0.3.36 vendors ggml-org/llama.cpp@0c1e57098 (its CHANGELOG)."""
TARGETS = ("llama-bench", "llama-quantize")
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",          # -march=native: whatever this CPU has (AVX2, AVX512, AMX...)
    "-DBUILD_SHARED_LIBS=OFF",   # self-contained binaries in build/bin
    "-DLLAMA_OPENSSL=OFF",       # no downloads from the tools
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
)
BUILD_TOOLS_HINT = "sudo apt-get update && sudo apt-get install -y cmake build-essential"


class BenchError(RuntimeError):
    """A step of the benchmark failed; the message (one line) says what to do."""


@dataclass(frozen=True)
class LlamaCpp:
    """A built llama.cpp: its source tree (converter, gguf-py) and its tools."""

    version: str
    source: Path
    bin: Path

    def tool(self, name: str) -> Path:
        return self.bin / name


def ensure_llama_cpp(*, version: str = LLAMA_CPP_PYTHON_VERSION, cache: Path = CACHE, jobs: int | None = None) -> LlamaCpp:
    """Download, unpack and build, skipping every step whose result is already cached."""
    folder = cache / version
    source = unpack_source(download_sdist(version=version, cache=cache), folder / "source")
    bin_dir = build(source, folder / "build", jobs=jobs or os.cpu_count() or 1)
    return LlamaCpp(version=version, source=source, bin=bin_dir)


def existing_llama_cpp(*, version: str = LLAMA_CPP_PYTHON_VERSION, cache: Path = CACHE) -> LlamaCpp:
    """The cached build, for ``--skip-build``; raises when it is not there."""
    built = LlamaCpp(version=version, source=cache / version / "source", bin=cache / version / "build" / "bin")
    missing = [name for name in TARGETS if not built.tool(name).is_file()]
    if missing:
        raise BenchError(f"--skip-build, but {', '.join(missing)} not found in {built.bin}: run without --skip-build")
    return built


def download_sdist(*, version: str, cache: Path) -> Path:
    path = cache / f"llama_cpp_python-{version}.tar.gz"
    if path.is_file():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    logger.info("downloading the llama-cpp-python %s sdist (llama.cpp's source) from PyPI", version)
    command = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--quiet",
               f"llama-cpp-python=={version}", "--dest", str(cache)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not path.is_file():
        said = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise BenchError(
            f"pip could not download llama-cpp-python=={version} from PyPI ({said}); "
            f"without network, put llama_cpp_python-{version}.tar.gz into {cache} yourself")
    return path


def unpack_source(sdist: Path, target: Path) -> Path:
    """Extract only the sdist's ``vendor/llama.cpp`` into ``target``."""
    if (target / "CMakeLists.txt").is_file():
        return target
    prefix = f"{sdist.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    logger.info("unpacking llama.cpp from %s", sdist.name)
    with tarfile.open(sdist) as archive:
        members = []
        for member in archive.getmembers():
            if member.name.startswith(prefix):
                member.name = member.name.removeprefix(prefix)
                members.append(member)
        if not members:
            raise BenchError(f"{sdist} has no {prefix}: delete it and run again to download it anew")
        archive.extractall(staging, members=members, filter="data")
    staging.rename(target)
    return target


def build(source: Path, build_dir: Path, *, jobs: int) -> Path:
    """Configure and build ``TARGETS`` (Release, CPU backend, native); skipped when the stamp matches."""
    bin_dir = build_dir / "bin"
    stamp_path = build_dir / "bench-build.json"
    stamp = {"source": _tree_digest(source), "options": list(CMAKE_OPTIONS), "targets": list(TARGETS),
             "cpu": _cpu_signature()}
    if stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp \
            and all((bin_dir / name).is_file() for name in TARGETS):
        logger.info("llama.cpp already built in %s", bin_dir)
        return bin_dir
    _check_build_tools()
    build_dir.mkdir(parents=True, exist_ok=True)
    log = build_dir / "build.log"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    logger.info("building %s with %d jobs (several minutes on 2 cores; log: %s)", " ".join(TARGETS), jobs, log)
    with log.open("w") as output:
        for command in (
            ["cmake", "-S", str(source), "-B", str(build_dir), *generator, *CMAKE_OPTIONS,
             f"-DLLAMA_BUILD_COMMIT=llama-cpp-python-{source.parent.name}"],
            ["cmake", "--build", str(build_dir), "--config", "Release", "--target", *TARGETS, "-j", str(jobs)],
        ):
            output.write(f"$ {' '.join(command)}\n")
            output.flush()
            if subprocess.run(command, stdout=output, stderr=subprocess.STDOUT).returncode != 0:
                raise BenchError(f"building llama.cpp failed at `{' '.join(command[:2])}`: see {log}")
    stamp_path.write_text(json.dumps(stamp, indent=2))
    return bin_dir


def _check_build_tools() -> None:
    missing = [tool for tool in ("cmake", "cc", "c++") if shutil.which(tool) is None]
    if not (shutil.which("ninja") or shutil.which("make")):
        missing.append("make")
    if missing:
        raise BenchError(f"building llama.cpp needs {', '.join(missing)}: {BUILD_TOOLS_HINT}")


def _tree_digest(source: Path) -> str:
    """A digest of the build inputs' names and sizes: cheap, and changes with the source version."""
    digest = hashlib.sha256()
    for path in sorted(source.rglob("*")):
        if path.is_file():
            digest.update(f"{path.relative_to(source)}:{path.stat().st_size}\n".encode())
    return digest.hexdigest()


def _cpu_signature() -> str:
    """GGML_NATIVE binaries fit the CPU they were built on: rebuild when it changes."""
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    wanted = [line for line in lines if line.startswith(("model name", "flags"))][:2]
    return hashlib.sha256("\n".join(wanted).encode()).hexdigest()[:16]
