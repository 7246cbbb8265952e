"""Shared fixtures: tiny real models built in code, the llama.cpp toolchain, and a doit runner."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "recipes" / "data"


def train_tokenizer(dest: Path, vocab_size: int = 512) -> None:
    """A SentencePiece BPE tokenizer.model with byte fallback (llama.cpp's converter reads it directly)."""
    import sentencepiece as spm
    spm.SentencePieceTrainer.train(
        input=str(DATA / "calibration.txt"), model_prefix=str(dest / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, num_threads=1, minloglevel=2,
        max_sentence_length=100000)
    (dest / "tokenizer.vocab").unlink()
    (dest / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False}))


def make_llama(dest: Path, seed: int, layers: int = 4, hidden: int = 256, vocab: int = 512,
               tokenizer_from: Path | None = None) -> Path:
    """A tiny Llama (random weights, bf16 safetensors) with a SentencePiece tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dest.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(dest)
    if tokenizer_from is None:
        train_tokenizer(dest, vocab)
    else:
        for name in ("tokenizer.model", "tokenizer_config.json"):
            shutil.copyfile(tokenizer_from / name, dest / name)
    return dest


def make_synthetic_llama(dest: Path, layers: int, hidden: int, inter: int, vocab: int, seed: int = 0) -> Path:
    """A Llama-shaped bf16 model of any size with random weights, written tensor by tensor (bounded memory),
    with a word-level tokenizer of its vocabulary size (for merge-stage tests and benchmarks)."""
    import torch

    from steps.tensors import OutTensor, write_model
    kv = hidden // 4
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
                       p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                       p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
                       p + "post_attention_layernorm.weight": (hidden,)})
    gen = torch.Generator().manual_seed(seed)

    def produce(shape: tuple[int, ...]):  # type: ignore[no-untyped-def]
        return lambda: bytes((torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16).view(torch.uint8).numpy())

    dest.mkdir(parents=True)
    write_model(dest, [OutTensor(n, "BF16", s, produce(s)) for n, s in shapes.items()], 5_000_000_000)
    (dest / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 16,
        "num_key_value_heads": 4, "vocab_size": vocab, "torch_dtype": "bfloat16", "rms_norm_eps": 1e-5}))
    write_word_tokenizer(dest, vocab)
    return dest


def write_word_tokenizer(dest: Path, vocab: int) -> None:
    """A word-level tokenizer.json of `vocab` entries (w1, w2, ...): a real tokenizer for models whose tests never
    convert them to GGUF."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = Tokenizer(models.WordLevel({"<unk>": 0, **{f"w{i}": i for i in range(1, vocab)}}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.save(str(dest / "tokenizer.json"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_llama(tmp_path_factory.mktemp("models") / "tiny-a", seed=1)


@pytest.fixture(scope="session")
def tiny_llama_b(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Path:
    return make_llama(tmp_path_factory.mktemp("models") / "tiny-b", seed=2, tokenizer_from=tiny_llama)


@pytest.fixture(scope="session")
def llama_cpp():  # type: ignore[no-untyped-def]
    """The llama.cpp toolchain (built once per machine and version; the first build takes minutes)."""
    from steps import toolchain
    toolchain.ensure()
    return toolchain.locate()


def generate(program: str, model: Path, prompt: str, n: int = 16, extra: tuple[str, ...] = ()) -> str:
    """Greedy completion with llama-completion. This llama.cpp version logs from a background thread that the
    program does not flush before it exits, so a run can end with its output lost: try again when it is empty."""
    for _ in range(10):
        proc = subprocess.run([program, "-m", str(model), "-p", prompt, "-n", str(n), "--temp", "0", "-no-cnv",
                               "-t", "2", *extra], capture_output=True, timeout=300)
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
        if proc.stdout.strip():
            return proc.stdout.decode(errors="replace")
    raise AssertionError(f"llama-completion printed nothing in 10 runs on {model}")


def llama_cpp_with_quantize(dest: Path, llama_cpp, body: str) -> Path:  # type: ignore[no-untyped-def]
    """A llama.cpp directory for MERGEFORGE_LLAMA_CPP: the real programs and converter, but llama-quantize
    replaced by a shell script (`body`; $REAL is the real program). `--version` still answers as the real one."""
    (dest / "bin").mkdir(parents=True)
    for item in llama_cpp.py_dir.iterdir():
        (dest / item.name).symlink_to(item)
    real = Path(llama_cpp.program("llama-quantize")).parent
    for prog in real.iterdir():
        if prog.name != "llama-quantize":
            (dest / "bin" / prog.name).symlink_to(prog)
    script = dest / "bin" / "llama-quantize"
    script.write_text(f'#!/bin/sh\nREAL={real}/llama-quantize\n'
                      f'case "$1" in --version) exec "$REAL" "$@";; esac\n{body}\n')
    script.chmod(0o755)
    return dest


@dataclass
class DoitResult:
    returncode: int
    output: str
    executed: list[str]
    uptodate: list[str]


@dataclass
class Workspace:
    """A recipes/build/store triple in a temporary directory, driven by the project's dodo.py."""
    path: Path

    @property
    def recipes(self) -> Path:
        return self.path / "recipes"

    @property
    def build(self) -> Path:
        return self.path / "build"

    @property
    def store(self) -> Path:
        return self.path / "cache"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(MERGEFORGE_RECIPES=str(self.recipes), MERGEFORGE_BUILD=str(self.build),
                   MERGEFORGE_STORE=str(self.store))
        return env

    def write_recipe(self, name: str, text: str) -> Path:
        self.recipes.mkdir(parents=True, exist_ok=True)
        path = self.recipes / f"{name}.yaml"
        path.write_text(text)
        return path

    def doit(self, *args: str, check: bool = True, env: dict[str, str] | None = None) -> DoitResult:
        proc = subprocess.run([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), *args],
                              cwd=self.path, env={**self.env(), **(env or {})}, capture_output=True, text=True,
                              timeout=1800)
        out = proc.stdout + proc.stderr
        if check and proc.returncode != 0:
            raise AssertionError(f"doit {' '.join(args)} failed ({proc.returncode}):\n{out[-6000:]}")
        return DoitResult(proc.returncode, out, re.findall(r"^\.  (\S+)", out, re.M),
                          re.findall(r"^-- (\S+)", out, re.M))

    def events(self, recipe: str) -> list[dict[str, object]]:
        path = self.build / recipe / ".mf" / "events.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def store_entries(self) -> set[str]:
        return {p.name for p in (self.store / "store").glob("*/*") if (p / "manifest.json").exists()}


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path)


# ---------------------------------------------------------------------------------------------- refusals

def _listing(root: Path, skip: tuple[str, ...] = ()) -> dict[str, int]:
    out: dict[str, int] = {}
    if not root.exists():
        return out
    for p in root.rglob("*"):
        rel = p.relative_to(root).as_posix()
        if rel.split("/", 1)[0] in skip:
            continue
        out[rel] = p.lstat().st_size if not p.is_dir() else -1
    return out


def assert_nothing_half_written(ws: Workspace) -> None:
    """No temporary file in build/, no stage left in the store's tmp/, no store entry without its manifest."""
    leftovers = [p for p in ws.build.rglob("*") if ".tmp" in p.name] if ws.build.exists() else []
    assert not leftovers, f"temporary files left in build/: {leftovers}"
    tmp = ws.store / "tmp"
    assert not tmp.exists() or not any(tmp.iterdir()), f"stages left in {tmp}: {list(tmp.iterdir())}"
    for entry in (ws.store / "store").glob("*/*") if (ws.store / "store").exists() else ():
        assert (entry / "manifest.json").exists(), f"incomplete store entry {entry}"


def assert_refused(ws: Workspace, *needles: str, args: tuple[str, ...] = (), max_seconds: float = 2.0,
                   env: dict[str, str] | None = None) -> str:
    """Run doit in the workspace and check a refusal as the README promises it: non-zero exit, no traceback, one
    distinct `mergeforge:` line holding every needle (file, key, fix), in time, nothing written outside build/ and
    the store, nothing half-written. Returns the line."""
    import time
    outside = _listing(ws.path, skip=("build", "cache"))
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), *args], cwd=ws.path,
                          env={**ws.env(), **(env or {})}, capture_output=True, text=True, timeout=600)
    seconds = time.monotonic() - started
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"accepted (exit 0):\n{out[-3000:]}"
    assert "Traceback" not in out, out[-6000:]
    lines = list(dict.fromkeys(line for line in out.splitlines() if line.startswith("mergeforge: ")))
    assert len(lines) == 1, f"expected one mergeforge: line, got {lines}:\n{out[-3000:]}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert seconds < max_seconds, f"refused after {seconds:.1f} s (limit {max_seconds} s): {lines[0]}"
    assert _listing(ws.path, skip=("build", "cache")) == outside, "something was written outside build/ and the store"
    assert_nothing_half_written(ws)
    return lines[0]
