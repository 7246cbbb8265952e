"""llama.cpp: find its programs and converter, build them once when absent, and run them.

Where llama.cpp comes from, first match wins:
  1. ``MERGEFORGE_LLAMA_CPP``: a llama.cpp checkout or install (``bin/`` or ``build/bin/`` with the programs,
     ``convert_hf_to_gguf.py`` and ``gguf-py/`` at its top);
  2. ``PATH``: the programs (the converter then comes from the built toolchain's sources);
  3. the ``toolchain`` task: the pinned llama.cpp vendored in the ``llama-cpp-python`` source distribution on PyPI,
     built once into ``$MERGEFORGE_HOME/llama.cpp/<version>/`` (outside the repository, so every clone and CI
     run on the machine shares it).

    python -m steps.toolchain            # build (or report) the toolchain
"""
from __future__ import annotations

import functools
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from steps import settings
from steps.errors import StepFailed, ToolNotFound

logger = logging.getLogger(__name__)

SDIST_PACKAGE = "llama-cpp-python"
SDIST_VERSION = "0.3.36"
LLAMA_CPP_COMMIT = "0c1e57098"
VERSION = f"llama.cpp-{LLAMA_CPP_COMMIT}"
PROGRAMS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-gguf-split", "llama-completion",
            "llama-server", "llama-mtmd-cli")
CMAKE_FLAGS = (
    "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_CURL=OFF",
)


def home() -> Path:
    return settings.home()


def toolchain_dir() -> Path:
    return home() / "llama.cpp" / VERSION


@dataclass(frozen=True)
class Toolchain:
    bin_dir: Path | None          # None: the programs are on PATH
    py_dir: Path                  # holds convert_hf_to_gguf.py, conversion/ and gguf-py/
    version: str

    def program(self, name: str) -> str:
        if self.bin_dir is not None:
            path = self.bin_dir / name
            if path.exists():
                return str(path)
        found = shutil.which(name)
        if found is None:
            raise ToolNotFound(f"{name} not found in {self.bin_dir or 'PATH'}; run `doit toolchain` to build it")
        return found

    @property
    def converter(self) -> Path:
        return self.py_dir / "convert_hf_to_gguf.py"

    def converter_env(self) -> dict[str, str]:
        """The converter runs with llama.cpp's own gguf-py: PyPI's gguf of the same number is older."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.py_dir / "gguf-py"), env.get("PYTHONPATH")]))
        env["NO_LOCAL_GGUF"] = ""
        return env


def _configured() -> Toolchain | None:
    root = settings.llama_cpp()
    if not root:
        return None
    base = Path(root).expanduser()
    for bin_dir in (base / "build" / "bin", base / "bin", base):
        if (bin_dir / "llama-quantize").exists():
            break
    else:
        raise ToolNotFound(f"MERGEFORGE_LLAMA_CPP={root} holds no llama-quantize (looked in build/bin, bin, .)")
    if not (base / "convert_hf_to_gguf.py").exists():
        raise ToolNotFound(f"MERGEFORGE_LLAMA_CPP={root} holds no convert_hf_to_gguf.py at its top")
    return Toolchain(bin_dir, base, f"local:{_tool_version(bin_dir / 'llama-quantize')}")


def _tool_version(program: Path) -> str:
    try:
        out = subprocess.run([str(program), "--version"], capture_output=True, text=True, timeout=30)
    except OSError as exc:
        raise ToolNotFound(f"cannot run {program}: {exc}") from exc
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("version:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def locate() -> Toolchain:
    """The toolchain a build uses; cheap (no build, at most one ``--version`` call)."""
    configured = _configured()
    if configured is not None:
        return configured
    built = toolchain_dir()
    on_path = shutil.which("llama-quantize")
    if on_path and not (built / "bin" / "llama-quantize").exists():
        return Toolchain(None, built / "py", f"path:{_tool_version(Path(on_path))}")
    return Toolchain(built / "bin", built / "py", VERSION)


def is_built() -> bool:
    """The pinned version is built with every program this code needs (an older build with fewer is rebuilt)."""
    done = toolchain_dir() / "BUILD.json"
    if not done.exists():
        return False
    info = json.loads(done.read_text())
    return info.get("version") == VERSION and set(PROGRAMS) <= set(info.get("programs", []))


def is_available() -> bool:
    """doit uptodate of the toolchain task: configured, on PATH, or built."""
    try:
        chain = locate()
    except ToolNotFound:
        return False
    return chain.bin_dir != toolchain_dir() / "bin" or is_built()


def ensure() -> None:
    """doit action of the toolchain task."""
    if not is_available():
        build()


def _sdist() -> Path:
    dl = home() / "downloads"
    dl.mkdir(parents=True, exist_ok=True)
    name = f"{SDIST_PACKAGE.replace('-', '_')}-{SDIST_VERSION}.tar.gz"
    if not (dl / name).exists():
        logger.info("downloading the %s %s source distribution (77 MB)", SDIST_PACKAGE, SDIST_VERSION)
        download(["--no-binary", ":all:", f"{SDIST_PACKAGE}=={SDIST_VERSION}"], dl,
                 f"llama.cpp sources ({SDIST_PACKAGE}=={SDIST_VERSION})")
    return dl / name


def download(args: list[str], dest: Path, what: str) -> None:
    """pip download (no dependencies) into dest; a failure is one line saying what to do."""
    try:
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "off", *args, "-d", str(dest)],
            what=f"download {what}")
    except StepFailed as exc:
        reason = next((line.strip() for line in reversed(str(exc).splitlines())
                       if line.strip().startswith("ERROR:")), "pip failed")
        raise StepFailed(f"cannot download {what} from the package registry ({reason}); check the network and "
                         f"the pip configuration, or put the file in {dest} and run doit again") from None


def _extract(sdist: Path, dest: Path) -> Path:
    prefix = f"{sdist.name[:-len('.tar.gz')]}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            if m.name.startswith(prefix) and "/.git" not in m.name[len(prefix) - 1:] and (m.isfile() or m.isdir()):
                m.name = m.name[len(prefix):]
                if m.name:
                    members.append(m)
        tar.extractall(dest, members=members, filter="data")
    return dest


# The CPU features ggml's kernels dispatch on, and that the build's -march=native compiles in: another set computes
# other floating-point sums, so an imatrix, a quant, a PPL or a reply made with it is another machine's.
GGML_CPU_FLAGS = ("sse3", "ssse3", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq",
                  "avx512_vnni", "avx512_bf16", "avx_vnni", "asimd", "asimdhp", "asimddp", "fphp", "sve", "sve2",
                  "i8mm", "bf16")


@functools.cache
def build_target() -> str:
    """What llama.cpp's arithmetic depends on beyond its version, in words: the CPU architecture, the features of
    GGML_CPU_FLAGS this CPU has (the build targets the CPU it is built on), and ``cuda`` when the build has CUDA.
    Stages whose bytes depend on it put it in their keys (constants.StageSpec.native)."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags.update(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    words = [platform.machine().lower() or "unknown", *(f for f in GGML_CPU_FLAGS if f in flags)]
    try:
        info = json.loads((toolchain_dir() / "BUILD.json").read_text())
        if "-DGGML_CUDA=ON" in info.get("flags", []):
            words.append("cuda")
    except (OSError, ValueError):
        pass
    return " ".join(words)


def has_gpu() -> bool:
    """nvcc alone is not enough: a CUDA build on a machine with no GPU only costs time."""
    smi = shutil.which("nvidia-smi")
    return smi is not None and subprocess.run([smi, "-L"], capture_output=True).returncode == 0


def build() -> Toolchain:
    """Build the pinned llama.cpp programs once; a built version is never rebuilt. Concurrent callers (two doit
    runs, two clones sharing MERGEFORGE_HOME) serialize on a lock: the first builds, the others wait and use it."""
    import fcntl
    target = toolchain_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{VERSION}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("another process is building llama.cpp %s; waiting for it", VERSION)
            fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_locked(target)


def _build_locked(target: Path) -> Toolchain:
    if is_built():
        logger.info("llama.cpp %s already built in %s", VERSION, target)
        return locate()
    for stale in target.parent.glob(f"{VERSION}.*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)  # an interrupted earlier build (we hold the lock)
    work = Path(tempfile.mkdtemp(prefix=f"{VERSION}.", dir=target.parent))
    src = _extract(_sdist(), work / "py")
    flags = list(CMAKE_FLAGS)
    if platform.machine().lower() in ("x86_64", "amd64"):
        # -march=native turns on AMX where the CPU lists it; a VM that lists AMX without granting its tile state
        # faults in ggml's AMX kernels (seen: Q8_0 loads end in a general protection fault), so the build leaves
        # AMX out. Explicit -mno-* options win over -march=native whatever their order.
        no_amx = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
        flags += [f"-DCMAKE_C_FLAGS={no_amx}", f"-DCMAKE_CXX_FLAGS={no_amx}"]
    if shutil.which("nvcc") and has_gpu():
        flags.append("-DGGML_CUDA=ON")
    started = time.time()
    run(["cmake", "-S", str(src), "-B", str(work / "cmake"), *flags], what="configure llama.cpp", stream=True)
    run(["ninja", "-C", str(work / "cmake"), *PROGRAMS], what="build llama.cpp", stream=True)
    (work / "bin").mkdir()
    for name in PROGRAMS:
        shutil.copy2(work / "cmake" / "bin" / name, work / "bin" / name)
    shutil.rmtree(work / "cmake")
    for sub in ("ggml", "src", "tools", "examples", "common", "vendor", "docs", "tests", "scripts", "models"):
        shutil.rmtree(src / sub, ignore_errors=True)
    (work / "BUILD.json").write_text(json.dumps(
        {"version": VERSION, "sdist": f"{SDIST_PACKAGE}=={SDIST_VERSION}", "programs": list(PROGRAMS),
         "flags": flags, "seconds": round(time.time() - started, 1)}, indent=1))
    if target.exists():
        shutil.rmtree(target)
    os.replace(work, target)
    logger.info("built llama.cpp %s in %.0f s into %s", VERSION, time.time() - started, target)
    return locate()


_PROBE = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from conversion import get_model_class
from conversion.base import ModelBase, ModelType, get_model_architecture
hparams = ModelBase.load_hparams(Path(sys.argv[2]), False)
out = {}
for kind, model_type in (("text", ModelType.TEXT), ("mmproj", ModelType.MMPROJ)):
    try:
        arch = get_model_architecture(hparams, model_type)
        cls = get_model_class(arch, mmproj=model_type == ModelType.MMPROJ)
        out[kind] = {"arch": arch, "class": cls.__name__, "mtp": bool(getattr(cls, "supports_mtp_export", False))}
    except (NotImplementedError, KeyError, ValueError, AssertionError) as exc:
        out[kind] = {"error": str(exc)}
print(json.dumps(out))
"""


def converter_classes(model_dir: Path) -> dict[str, dict[str, object]]:
    """What llama.cpp's converter would use for a model directory, asked of the converter itself:
    ``{"text": {"arch", "class", "mtp"}, "mmproj": {...} or {"error"}}`` (``mtp``: it takes ``--no-mtp``)."""
    chain = locate()
    out = run([sys.executable, "-c", _PROBE, str(chain.py_dir), str(model_dir)], what="inspect with the converter",
              env=chain.converter_env(), stream=False)
    return json.loads(out.strip().splitlines()[-1])


LOAD_CHECK_TRIES = 4


def smoke_load(gguf: Path, *, mmproj: Path | None = None, image: Path | None = None) -> None:
    """Load a GGUF in llama.cpp and generate one token (with its projector and an image, through llama-mtmd-cli),
    so a file no client can load fails the stage that made it, before it reaches the store."""
    from steps.settings import threads
    chain = locate()
    common = ["-n", "1", "--temp", "0", "-c", "256", "-t", str(threads()), *gpu_args()]
    if mmproj is None:
        argv = [chain.program("llama-completion"), "-m", str(gguf), "-p", "Hello", "-no-cnv", *common]
    else:
        argv = [chain.program("llama-mtmd-cli"), "-m", str(gguf), "--mmproj", str(mmproj), "--image", str(image),
                "-p", "Describe the image.", *common]
    reason = ""
    for _ in range(LOAD_CHECK_TRIES):
        try:
            run(argv, what=f"load check {gguf.name}", stream=False)
            return
        except StepFailed as exc:
            tail = str(exc).split("output (last lines):\n", 1)[-1].split("\n  nothing was written")[0]
            lines = [re.sub(r"^[0-9.]+ [EWI] ", "", line.strip()) for line in tail.splitlines() if line.strip()]
            errors = [line for line in lines if "error" in line.lower() or "failed" in line.lower()]
            reason = " | ".join(errors[:2] or lines[-3:]).replace(str(gguf.parent) + "/", "")
            if errors:
                break
            # llama.cpp logs from a worker thread that an early exit can cut short (measured: 2 runs in 12 lost
            # every line): the load fails the same way each time, so ask again for its reason
    raise StepFailed(f"llama.cpp cannot load {gguf.name}{' with ' + mmproj.name if mmproj else ''}: "
                     f"{reason}; the file was not kept (nothing reached "
                     "build/ or the store). Check the merged config against its tensors, e.g. gguf.mtp for a "
                     "model whose MTP head is missing, and run doit again")


def split_gguf(path: Path, max_size: str | None) -> list[Path]:
    """A GGUF above ``max_size`` (``50G``, ``500M``) split into ``<name>-0000k-of-0000n.gguf`` parts with
    llama-gguf-split (the Hub takes files up to 50 GB; llama.cpp loads the first part and finds the others);
    the parts, or the file itself when it fits."""
    if max_size is None:
        return [path]
    limit = int(max_size[:-1]) * (10**9 if max_size.endswith("G") else 10**6)   # llama-gguf-split's units
    if path.stat().st_size <= limit:
        return [path]
    prefix = path.with_suffix("")
    run([locate().program("llama-gguf-split"), "--split", "--split-max-size", max_size, str(path), str(prefix)],
        what=f"split {path.name}")
    path.unlink()
    parts = sorted(path.parent.glob(f"{prefix.name}-*-of-*.gguf"))
    if not parts:
        raise StepFailed(f"llama-gguf-split wrote no parts for {path.name}")
    return parts


def gpu_args() -> list[str]:
    """``-ngl N`` from MERGEFORGE_GPU_LAYERS: a machine setting; it enters the keys of the stages whose bytes it
    changes (constants.StageSpec.native)."""
    layers = settings.gpu_layers()
    return ["-ngl", layers] if layers else []


def run(argv: list[str], *, what: str, env: dict[str, str] | None = None, cwd: Path | None = None,
        stream: bool | None = None) -> str:
    """Run one external program (list argv, never a shell) and return the last lines of its output; on failure
    raise StepFailed with the command and that tail.

    The output is shown live when ``stream`` is true, by default when stderr is a terminal (a long imatrix or
    build shows its progress; logs and CI stay quiet).
    """
    show = sys.stderr.isatty() if stream is None else stream
    logger.info("%s: %s", what, " ".join(argv))
    try:
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace")
    except FileNotFoundError as exc:
        raise ToolNotFound(f"{what}: {argv[0]} not found; run `doit toolchain` or set MERGEFORGE_LLAMA_CPP") from exc
    tail: deque[str] = deque(maxlen=40)
    with proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if show:
                sys.stderr.write(line)
            tail.append(line)
    text = "".join(tail)
    if proc.returncode != 0:
        raise StepFailed(f"{what} failed (exit {proc.returncode})\n  command: {' '.join(argv)}\n"
                         f"  output (last lines):\n{text}\n  nothing was written to build/; fix the cause above "
                         "and run doit again (finished stages restore from the store)")
    return text


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    chain = build()
    print(json.dumps({"bin": str(chain.bin_dir), "converter": str(chain.converter), "version": chain.version}))
