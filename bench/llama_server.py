"""llama.cpp's `llama-server`, built here from the llama.cpp vendored in llama-cpp-python's sdist.

Building from the sdist of the llama-cpp-python version that is installed gives the server the very
llama.cpp that bench/decode.py measures through the Python binding, compiled for this CPU
(GGML_NATIVE), with nothing fetched but the sdist from PyPI: the web UI is neither built nor
downloaded. The binary is cached per version in ~/.cache/gptstack-bench (GPTSTACK_BENCH_CACHE moves it).

    python bench/llama_server.py            # builds once (minutes on 2 cores), prints the binary's path
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

CACHE = Path(os.environ.get("GPTSTACK_BENCH_CACHE", Path.home() / ".cache" / "gptstack-bench"))
CMAKE_OPTIONS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",               # this CPU's instruction sets, as llama-cpp-python was built
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_UI=OFF",           # the web UI: not built with npm ...
    "-DLLAMA_USE_PREBUILT_UI=OFF",    # ... nor downloaded from Hugging Face
    "-DLLAMA_OPENSSL=OFF",            # plain HTTP on 127.0.0.1
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
]


def installed_version() -> str:
    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        raise SystemExit("llama-cpp-python is not installed; pip install 'gptstack[bench]' (it builds from source)") from None


def llama_server(release: str | None = None, jobs: int | None = None) -> Path:
    """The path of a llama-server built from llama-cpp-python ``release``'s sdist (default: the
    installed version); built on the first call, then taken from the cache."""
    release = release or installed_version()
    work = CACHE / f"llama-cpp-python-{release}"
    binary = work / "build" / "bin" / "llama-server"
    if binary.exists():
        return binary
    source = vendored_llama_cpp(release, work)
    run(["cmake", "-S", str(source), "-B", str(work / "build"), *CMAKE_OPTIONS])
    run(["cmake", "--build", str(work / "build"), "--target", "llama-server", "-j", str(jobs or os.cpu_count() or 2)])
    return binary


def vendored_llama_cpp(release: str, work: Path) -> Path:
    """The sdist from PyPI (pip download, source only), extracted once; its vendor/llama.cpp."""
    sdist = CACHE / f"llama_cpp_python-{release}.tar.gz"
    if not sdist.exists():
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={release}", "-d", str(CACHE)])
    source = work / f"llama_cpp_python-{release}" / "vendor" / "llama.cpp"
    if not source.exists():
        with tarfile.open(sdist) as archive:
            archive.extractall(work, filter="data")
    return source


def run(command: list[str]) -> None:
    print("+", " ".join(command), file=sys.stderr, flush=True)
    subprocess.run(command, check=True)


if __name__ == "__main__":
    print(llama_server())
