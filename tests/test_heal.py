"""The heal stage on tiny models built in code: validation, the tokenized blend, a QLoRA run on CPU (loss, adapter,
healed weights against peft), kill -9 and resume to the same bytes, and a Qwen3.5 hybrid's linear-attention LoRA."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from steps.errors import RecipeError

ROOT = Path(__file__).resolve().parent.parent
CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
# ChatML whose generation prompt differs from how an assistant turn renders (as Qwen3.5's does with <think>)
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n\n</think>\n\n{% endif %}")
HEAL = """\
heal:
  quantization: nf4
  compute_dtype: float32
  lora: {r: 8, alpha: 16, dropout: 0.05}
  train: {learning_rate: 2.0e-3, warmup_steps: 2, batch_size: 2, grad_accum: 2, max_steps: 12, max_length: 96,
          save_steps: 4, logging_steps: 1, seed: 0, gradient_checkpointing: false}
  data:
    - {path: data/chat.jsonl, weight: 0.6}
    - {text: data/heal.txt, weight: 0.4}
"""


# ------------------------------------------------------------------------------------------------ helpers

def write_data(folder: Path) -> None:
    """A small chat JSONL (each answer a passage of the project's calibration text) and a text file."""
    folder.mkdir(parents=True, exist_ok=True)
    words = (ROOT / "recipes" / "data" / "calibration.txt").read_text().split()
    with open(folder / "chat.jsonl", "w") as f:
        for i in range(24):
            q, a = " ".join(words[i * 5:i * 5 + 4]), " ".join(words[i * 9:i * 9 + 14])
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Continue: {q}"},
                                             {"role": "assistant", "content": a}]}) + "\n")
    (folder / "heal.txt").write_text(" ".join(words[2000:3500]))


def recipe(folder: Path, model: Path, heal: str = HEAL, name: str = "tiny", dtype: str = "float32",
           layers: int = 4, template: str = CHAT) -> Path:
    write_data(folder / "data")
    path = folder / f"{name}.yaml"
    path.write_text(f"""\
name: {name}
sources:
  a: {{path: {model}}}
merge:
  merge_method: passthrough
  dtype: {dtype}
  chat_template: {json.dumps(template)}
  slices:
    - sources: [{{model: a, layer_range: [0, {layers}]}}]
""" + heal)
    return path


def stages(path: Path) -> dict[str, Any]:
    from steps.plan import plan
    from steps.recipe import load
    return {s.kind: s for s in plan(load(path))}


def run_heal(path: Path) -> dict[str, Any]:
    """fetch, merge and heal of a recipe through the executor; the heal's doit target (with its record)."""
    from steps.store import execute
    st = stages(path)
    for kind in ("fetch", "merge", "heal"):
        execute(st[kind])
    return json.loads(st["heal"].target.read_text())


@pytest.fixture
def stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MERGEFORGE_BUILD", str(tmp_path / "build"))
    monkeypatch.setenv("MERGEFORGE_STORE", str(tmp_path / "cache"))
    monkeypatch.setenv("MERGEFORGE_THREADS", "1")
    return tmp_path


@pytest.fixture(scope="module")
def healed(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> dict[str, Any]:
    """One uninterrupted heal of the tiny Llama (float32 merge, NF4 QLoRA): its recipe, build dir and target."""
    base = tmp_path_factory.mktemp("healed")
    saved = {k: os.environ.get(k) for k in ("MERGEFORGE_BUILD", "MERGEFORGE_STORE", "MERGEFORGE_THREADS")}
    os.environ.update(MERGEFORGE_BUILD=str(base / "build"), MERGEFORGE_STORE=str(base / "cache"),
                      MERGEFORGE_THREADS="1")
    try:
        path = recipe(base, tiny_llama)
        started = time.perf_counter()
        target = run_heal(path)
        seconds = time.perf_counter() - started
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return {"recipe": path, "build": base / "build" / "tiny", "store": base / "cache", "target": target,
            "seconds": seconds}


# ------------------------------------------------------------------------------------------------ validation

SEED_BLOCK = """\
heal:
  quantization: nf4
  double_quant: true
  compute_dtype: bfloat16
  lora: {r: 64, alpha: 32, dropout: 0.05, target_modules: auto, layers: [28, 36]}
  train: {learning_rate: 2.0e-5, schedule: cosine, warmup_steps: 50, batch_size: 2, grad_accum: 4, max_steps: 1000,
          max_length: 4096, save_steps: 250, logging_steps: 10, seed: 0, pack: true}
  data:
    - {hf: Jackrong/Qwen3.5-reasoning-700x, revision: 0123456789abcdef0123456789abcdef01234567, weight: 0.7}
    - {hf: Jackrong/Competitive-Programming-python-blend, revision: 89abcdef0123456789abcdef0123456789abcdef,
       split: train, weight: 0.15}
    - {path: data/chat.jsonl, weight: 0.15}
"""


def test_the_seed_configuration_is_expressible(tmp_path: Path, tiny_llama: Path) -> None:
    from steps.recipe import load
    r = load(recipe(tmp_path, tiny_llama, SEED_BLOCK))
    assert r.heal is not None
    assert r.heal["quantization"] == "nf4" and r.heal["double_quant"] and r.heal["compute_dtype"] == "bfloat16"
    assert r.heal["lora"] == {"r": 64, "alpha": 32.0, "dropout": 0.05, "target_modules": "auto", "layers": [28, 36]}
    assert r.heal["train"]["grad_accum"] == 4 and r.heal["train"]["learning_rate"] == 2e-5
    assert [d["weight"] for d in r.heal["data"]] == [0.7, 0.15, 0.15]
    assert r.heal["data"][0] == {"hf": "Jackrong/Qwen3.5-reasoning-700x", "revision": "0123456789abcdef0123456789abcdef"
                                 "01234567", "split": "train", "name": None, "weight": 0.7, "limit": None}
    assert r.heal["data"][2]["path"] == "data/chat.jsonl"                  # as written: the key moves with the repo
    assert r.heal_files == {"data[2]": (tmp_path / "data" / "chat.jsonl").resolve()}


def test_defaults_fill_every_key(tmp_path: Path, tiny_llama: Path) -> None:
    from steps.heal import DEFAULT_TRAIN
    from steps.recipe import load
    r = load(recipe(tmp_path, tiny_llama, "heal:\n  data: [{text: data/heal.txt}, {path: data/chat.jsonl}]\n"))
    assert r.heal == {"quantization": "nf4", "double_quant": True, "compute_dtype": "bfloat16",
                      "lora": {"r": 64, "alpha": 32.0, "dropout": 0.05, "target_modules": "auto", "layers": None},
                      "train": DEFAULT_TRAIN,
                      "data": [{"text": "data/heal.txt", "weight": 1.0},
                               {"path": "data/chat.jsonl", "weight": 1.0, "limit": None}]}
    # the same blend spelt with heal.weights normalizes to the same block
    a = load(recipe(tmp_path, tiny_llama, "heal:\n  data: [{text: data/heal.txt, weight: 3}, "
                    "{path: data/chat.jsonl, weight: 1}]\n"))
    b = load(recipe(tmp_path, tiny_llama, "heal:\n  weights: [3, 1]\n  data: [{text: data/heal.txt}, "
                    "{path: data/chat.jsonl}]\n"))
    assert a.heal == b.heal


@pytest.mark.parametrize("block, key, needle", [
    ("heal:\n  lora: {alhpa: 8}\n  data: [{text: data/heal.txt}]\n", "heal.lora.alhpa", "did you mean 'alpha'"),
    ("heal:\n  quantisation: nf4\n  data: [{text: data/heal.txt}]\n", "heal.quantisation",
     "did you mean 'quantization'"),
    ("heal:\n  quantization: nf5\n  data: [{text: data/heal.txt}]\n", "heal.quantization", "did you mean 'nf4'"),
    ("heal:\n  quantization: int8\n  double_quant: true\n  data: [{text: data/heal.txt}]\n", "heal.double_quant",
     "nf4 setting"),
    ("heal:\n  data: [{path: data/missing.jsonl}]\n", "heal.data[0].path", "file not found"),
    ("heal:\n  data: [{text: data/heal.txt}, {path: data/chat.jsonl}]\n  weights: [0.7, 0.2, 0.1]\n",
     "heal.weights", "3 weights for 2 datasets"),
    ("heal:\n  data: [{text: data/heal.txt, weight: 0.7}, {path: data/chat.jsonl}]\n", "heal.data[1].weight",
     "give every dataset a weight, or none"),
    ("heal:\n  data: [{text: data/heal.txt, weight: 0}]\n", "heal.data[0].weight", "positive number"),
    ("heal:\n  data: [{text: data/heal.txt, weight: -1}]\n", "heal.data[0].weight", "positive number"),
    ("heal:\n  data: [{path: data/heal.txt}]\n", "heal.data[0].path", "unknown row format '.txt'"),
    ("heal:\n  data: [{hf: org/set}]\n", "heal.data[0].revision", "40-hex commit"),
    ("heal:\n  data: [{hf: org/set, revision: main}]\n", "heal.data[0].revision", "a branch or tag moves"),
    ("heal:\n  data: [{text: data/heal.txt, split: train}]\n", "heal.data[0].split", "for hf: datasets"),
    ("heal:\n  data: [{text: data/heal.txt, path: data/chat.jsonl}]\n", "heal.data[0]", "exactly one of"),
    ("heal:\n  data: []\n", "heal.data", "expected a list"),
    ("heal:\n  lora: {r: 8}\n", "heal.data", "missing"),
    ("heal:\n  train: {max_steps: 0}\n  data: [{text: data/heal.txt}]\n", "heal.train.max_steps",
     "positive integer"),
    ("heal:\n  train: {schedule: cosin}\n  data: [{text: data/heal.txt}]\n", "heal.train.schedule",
     "did you mean 'cosine'"),
    ("heal:\n  train: {learning_rate: fast}\n  data: [{text: data/heal.txt}]\n", "heal.train.learning_rate",
     "positive number"),
    ("heal:\n  lora: {dropout: 1.0}\n  data: [{text: data/heal.txt}]\n", "heal.lora.dropout", "[0, 1)"),
    ("heal:\n  lora: {layers: [4, 2]}\n  data: [{text: data/heal.txt}]\n", "heal.lora.layers", "start < end"),
    ("heal:\n  lora: {target_modules: [q_proj, q_proj]}\n  data: [{text: data/heal.txt}]\n",
     "heal.lora.target_modules[1]", "listed twice"),
    ("heal:\n  compute_dtype: fp16\n  data: [{text: data/heal.txt}]\n", "heal.compute_dtype", "float16"),
])
def test_bad_blocks_are_refused_when_the_recipe_loads(tmp_path: Path, tiny_llama: Path, block: str, key: str,
                                                      needle: str) -> None:
    from steps.recipe import load
    path = recipe(tmp_path, tiny_llama, block)
    with pytest.raises(RecipeError) as exc:
        load(path)
    assert exc.value.file == str(path) and exc.value.key == key, str(exc.value)
    assert needle in exc.value.message, str(exc.value)
    assert len(str(exc.value).splitlines()) == 1


def test_yaml_spellings_of_numbers_and_off(tmp_path: Path, tiny_llama: Path) -> None:
    from steps.recipe import load
    r = load(recipe(tmp_path, tiny_llama, "heal:\n  quantization: off\n  train: {learning_rate: 2e-5}\n"
                    "  data: [{text: data/heal.txt}]\n"))
    assert r.heal is not None
    assert r.heal["quantization"] == "none" and not r.heal["double_quant"]
    assert r.heal["train"]["learning_rate"] == 2e-5            # YAML reads 2e-5 as a string


# ------------------------------------------------------------------------------------------------ the data

def test_chat_rows_carry_loss_on_assistant_tokens_only(stores: Path, tiny_llama: Path) -> None:
    from steps.heal import merged_dir, prepare_tokens, text_tokenizer
    from steps.store import execute
    path = recipe(stores, tiny_llama, template=CHATML, heal="""\
heal:
  train: {max_length: 256, pack: false}
  data:
    - {path: data/rows.jsonl}
""")
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "one two"},
                          {"role": "assistant", "content": "three four"}, {"role": "user", "content": "five"},
                          {"role": "assistant", "content": "six seven"}]},
            {"prompt": "eight", "response": "nine ten"},
            {"text": "eleven twelve"},
            {"messages": [{"role": "user", "content": "no answer"}]},
            {"other": 1}]
    (stores / "data" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    st = stages(path)
    execute(st["fetch"])
    execute(st["merge"])
    tokens = prepare_tokens(st["heal"])
    tok = text_tokenizer(merged_dir(st["heal"]))
    got = set()
    for k in range(len(tokens)):
        span = slice(tokens.starts[k], tokens.starts[k + 1])
        ids, mask = tokens.ids[span], tokens.mask[span]
        text = tok.decode(ids, skip_special_tokens=False)
        trained = tok.decode(ids[mask.astype(bool)], skip_special_tokens=False)
        got.add((text.replace(" ", ""), trained.replace(" ", "")))
    assert ("<|im_start|>system\nBebrief.<|im_end|>\n<|im_start|>user\nonetwo<|im_end|>\n<|im_start|>assistant\n"
            "threefour<|im_end|>\n<|im_start|>user\nfive<|im_end|>\n<|im_start|>assistant\nsixseven<|im_end|>\n",
            "threefour<|im_end|>\nsixseven<|im_end|>\n") in got
    assert ("<|im_start|>user\neight<|im_end|>\n<|im_start|>assistant\nnineten<|im_end|>\n",
            "nineten<|im_end|>\n") in got
    assert ("<s>eleventwelve</s>", "<s>eleventwelve</s>") in got
    assert tokens.info["sources"][0]["rejected"] == {"without an assistant turn": 1,
                                                     "without messages, prompt/response or text": 1}
    assert len(got) == 3 and tokens.info["rows"] == 3


def test_blend_shares_and_token_digest(stores: Path, tiny_llama: Path) -> None:
    """Weights decide each source's share of rows; the digest follows the tokens, and a weight change moves it."""
    from steps.heal import key_inputs
    from steps.store import execute, stat_cache
    path = recipe(stores, tiny_llama, heal="heal:\n  train: {max_length: 160}\n  data:\n"
                  "    - {path: data/chat.jsonl, weight: 3}\n    - {text: data/heal.txt, weight: 1}\n")
    st = stages(path)
    execute(st["fetch"])
    execute(st["merge"])
    first = key_inputs(st["heal"], stat_cache())
    again = key_inputs(st["heal"], stat_cache())                   # from the cache: same digest
    assert first == again and first["rows"] > 0 and first["tokens_count"] > 0
    from steps.heal import load_tokens
    info = load_tokens(st["heal"], stat_cache()).info
    chat, text = info["sources"]
    total = chat["usable"] + text["usable"]
    assert chat["selected"] == round(total * 3 / 4) and text["selected"] == round(total / 4)
    path.write_text(path.read_text().replace("weight: 3", "weight: 2"))
    moved = key_inputs(stages(path)["heal"], stat_cache())
    assert moved["tokens"] != first["tokens"]
    # a comment changes nothing
    path.write_text(path.read_text() + "# a comment\n")
    assert key_inputs(stages(path)["heal"], stat_cache()) == moved


def test_hf_dataset_from_the_local_cache_and_refused_when_absent(stores: Path, tiny_llama: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from steps.heal import key_inputs, load_tokens
    from steps.store import execute, stat_cache
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = stores / "hf" / "hub" / "datasets--acme--chat"
    (repo / "snapshots" / rev / "data").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    (repo / "snapshots" / rev / "data" / "train.jsonl").write_text(
        "".join(json.dumps({"prompt": f"question {i}", "response": f"answer {i} " * 5}) + "\n" for i in range(8)))
    monkeypatch.setenv("HF_HOME", str(stores / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(stores / "hf" / "hub"))
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(stores / "hf" / "hub"))
    path = recipe(stores, tiny_llama, heal=f"heal:\n  data:\n    - {{hf: acme/chat, revision: {rev}, limit: 6}}\n")
    st = stages(path)
    execute(st["fetch"])
    execute(st["merge"])
    key_inputs(st["heal"], stat_cache())
    source = load_tokens(st["heal"], stat_cache()).info["sources"][0]
    assert source["read"] == 6 and source["usable"] == 6
    path.write_text(path.read_text().replace("acme/chat", "acme/absent"))
    with pytest.raises(RecipeError) as exc:
        key_inputs(stages(path)["heal"], stat_cache())
    assert exc.value.key == "heal.data[0].hf" and "not in the local Hugging Face cache" in exc.value.message
    assert "hub access is not supported yet" in exc.value.message


# ------------------------------------------------------------------------------------------------ refusals

@pytest.mark.parametrize("block, key, needle", [
    ("heal:\n  lora: {target_modules: [q_proj, gate_prj]}\n  data: [{text: data/heal.txt}]\n",
     "heal.lora.target_modules[1]", "no linear layer named 'gate_prj' in the decoder blocks (did you mean "
     "'gate_proj'?)"),
    ("heal:\n  lora: {target_modules: [input_layernorm]}\n  data: [{text: data/heal.txt}]\n",
     "heal.lora.target_modules[0]", "'input_layernorm' is a LlamaRMSNorm, not a linear layer"),
    ("heal:\n  lora: {layers: [2, 9]}\n  data: [{text: data/heal.txt}]\n", "heal.lora.layers",
     "outside the merged model, which has 4 layers"),
    ("heal:\n  data: [{text: data/heal.txt}, {path: data/empty.jsonl}]\n", "heal.data[1].path",
     "no usable rows (3 read: 2 without messages, prompt/response or text; 1 without an assistant turn)"),
    ("heal:\n  data: [{path: data/bad.jsonl}]\n", "heal.data[0].path", "line 2 is not valid JSON"),
])
def test_bad_blocks_fail_before_training(stores: Path, tiny_llama: Path, block: str, key: str, needle: str) -> None:
    from steps.store import execute
    path = recipe(stores, tiny_llama, block)
    (stores / "data" / "empty.jsonl").write_text('{"a": 1}\n{"b": 2}\n{"messages": [{"role": "user", '
                                                  '"content": "hi"}]}\n')
    (stores / "data" / "bad.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    st = stages(path)
    execute(st["fetch"])
    execute(st["merge"])
    with pytest.raises(RecipeError) as exc:
        execute(st["heal"])
    assert exc.value.file == str(path) and exc.value.key == key, str(exc.value)
    assert needle in exc.value.message, str(exc.value)
    work = stores / "cache" / "work"
    assert not list(work.glob("heal.*")), "training started"
    assert not st["heal"].target.exists()


# ------------------------------------------------------------------------------------------------ a heal

def test_loss_falls_and_outputs_are_complete(healed: dict[str, Any]) -> None:
    build, record = healed["build"], healed["target"]["heal"]
    losses = json.loads((build / "loss.json").read_text())
    assert [e["step"] for e in losses] == list(range(1, 13))
    assert set(losses[0]) == {"step", "loss", "learning_rate", "grad_norm", "tokens_per_second"}
    assert all(e["tokens_per_second"] > 0 and e["grad_norm"] > 0 for e in losses)
    first, last = sum(e["loss"] for e in losses[:3]) / 3, sum(e["loss"] for e in losses[-3:]) / 3
    assert last < first - 0.2, losses
    assert (build / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert record["steps"] == 12 and record["resumed_from"] == 0
    assert record["first_loss"] == losses[0]["loss"] and record["last_loss"] == losses[-1]["loss"]
    assert 0 < record["trainable_params"] < record["params"]
    assert record["lora_modules"] == 28 and record["layers"] == [0, 1, 2, 3]
    assert record["target_modules"] == ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj",
                                        "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"]
    assert record["tokens"] > 0 and record["tokens_trained"] > 0
    assert sorted(p.name for p in (build / "adapter").iterdir()) == ["adapter_config.json",
                                                                     "adapter_model.safetensors"]
    healed_dir, merged = build / "healed", build / "merged"
    assert sorted(p.name for p in healed_dir.iterdir()) == sorted(p.name for p in merged.iterdir())
    for name in ("config.json", "chat_template.jinja", "tokenizer.model", "tokenizer_config.json"):
        assert (healed_dir / name).read_bytes() == (merged / name).read_bytes()
    assert not list((healed["store"] / "work").glob("heal.*")), "the work directory is left behind"
    print(f"\nheal of the tiny Llama: {healed['seconds']:.1f} s in all, {record['seconds']:.1f} s training, "
          f"{record['seconds'] / 12:.3f} s/step, {sum(e['tokens_per_second'] for e in losses) / 12:.0f} tok/s, "
          f"loss {losses[0]['loss']:.3f} -> {losses[-1]['loss']:.3f}")


def test_disk_estimate_covers_the_outputs(healed: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from steps.heal import estimate_bytes
    monkeypatch.setenv("MERGEFORGE_BUILD", str(healed["build"].parent))
    monkeypatch.setenv("MERGEFORGE_STORE", str(healed["store"]))
    written = sum(p.stat().st_size for p in healed["build"].rglob("*") if p.is_file()
                  and p.relative_to(healed["build"]).parts[0] in ("healed", "adapter", "loss.json", "loss.png"))
    assert written <= estimate_bytes(stages(healed["recipe"])["heal"]) < 3 * written


def test_adapter_loads_and_healed_logits_equal_the_adapter_applied(healed: dict[str, Any]) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    build = healed["build"]
    ids = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(build / "merged", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, build / "adapter")           # as is: peft's own files
    model.eval()
    lora = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert len(lora) == 2 * 28
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)   # it trained
    with torch.no_grad():
        expected = model(ids).logits
        unmerged = model.merge_and_unload()
        reference = {k: v.clone() for k, v in unmerged.state_dict().items()}
    healed_model = AutoModelForCausalLM.from_pretrained(build / "healed", dtype=torch.float32).eval()
    with torch.no_grad():
        got = healed_model(ids).logits
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()
    # float32: the streamed merge gives peft's merge_and_unload weights bit for bit
    tensors = load_file(build / "healed" / "model.safetensors")
    assert tensors.keys() == reference.keys()
    for k, v in tensors.items():
        assert torch.equal(v, reference[k]), k


def test_healed_bf16_within_bf16_tolerance(healed: dict[str, Any], tmp_path: Path) -> None:
    """The same adapter merged into bf16 weights: W + s·BA rounded once to bf16. Against peft's merge_and_unload (which
    rounds the delta to bf16 first, then the sum) each weight is within one bf16 step; the logits are the adapter
    applied to the bf16 model's within bf16 tolerance, with the same top token wherever it is not a near tie."""
    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from steps.heal import write_healed
    build = healed["build"]
    bf16 = tmp_path / "bf16"
    shutil.copytree(build / "merged", bf16)
    (bf16 / "model.safetensors").chmod(0o644)
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(build / "merged" / "model.safetensors").items()},
              bf16 / "model.safetensors", metadata={"format": "pt"})
    write_healed(bf16, build / "adapter", tmp_path / "healed", 5_000_000_000)
    mine = load_file(tmp_path / "healed" / "model.safetensors")
    peft_bf16 = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.bfloat16),
                                          build / "adapter").merge_and_unload().state_dict()
    for k, v in mine.items():
        assert v.dtype == torch.bfloat16, k
        step = torch.finfo(torch.bfloat16).eps * peft_bf16[k].float().abs().clamp_min(1e-30)
        assert ((v.float() - peft_bf16[k].float()).abs() <= step).all(), k
    ids = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.float32),
                                      build / "adapter").eval()
    healed_model = AutoModelForCausalLM.from_pretrained(tmp_path / "healed", dtype=torch.float32).eval()
    with torch.no_grad():
        expected, got = model(ids).logits, healed_model(ids).logits
    diff = (got - expected).abs().max()
    assert diff < 1e-2 * expected.abs().max(), diff
    top2 = expected.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * diff
    assert clear.float().mean() > 0.5 and torch.equal(got.argmax(-1)[clear], expected.argmax(-1)[clear])


# ------------------------------------------------------------------------------------------------ kill and resume

DRIVER = """\
import json, os, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from transformers import TrainerCallback
import steps.heal as heal

class Hang(TrainerCallback):
    # after the checkpoint at step 4, at the end of step 6: say so, then hang until killed
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 6:
            Path({flag!r}).write_text("6")
            time.sleep(600)

heal.EXTRA_CALLBACKS.append(Hang())
from steps.plan import plan
from steps.recipe import load
from steps.store import execute
st = {{s.kind: s for s in plan(load({recipe!r}))}}
for kind in ("fetch", "merge", "heal"):
    execute(st[kind])
"""


def test_kill_mid_training_resumes_from_the_last_checkpoint_to_the_same_bytes(
        healed: dict[str, Any], stores: Path, tiny_llama: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = recipe(stores, tiny_llama)              # the same heal as the uninterrupted one, another store
    flag = stores / "at-step-6"
    driver = stores / "driver.py"
    driver.write_text(DRIVER.format(root=str(ROOT), flag=str(flag), recipe=str(path)))
    proc = subprocess.Popen([sys.executable, str(driver)], env=dict(os.environ), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not flag.exists():
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:] if proc.stdout else ""
            assert time.monotonic() < deadline, "the heal never reached step 6"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    (work,) = (stores / "cache" / "work").glob("heal.*")
    checkpoints = sorted(p.name for p in (work / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-4"], checkpoints
    # a kill in the middle of writing the next checkpoint leaves one without the marker: it must be passed over
    (work / "checkpoints" / "checkpoint-8").mkdir()
    (work / "checkpoints" / "checkpoint-8" / "adapter_model.safetensors").write_bytes(b"half")
    caplog.set_level("INFO")
    target = run_heal(path)
    assert target["heal"]["resumed_from"] == 4 and target["heal"]["steps"] == 12
    assert any("resuming from checkpoint-4 (step 4 of 12)" in r.getMessage() for r in caplog.records)
    build = stores / "build" / "tiny"
    assert (build / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (healed["build"] / "adapter" / "adapter_model.safetensors").read_bytes()
    assert (build / "healed" / "model.safetensors").read_bytes() == \
        (healed["build"] / "healed" / "model.safetensors").read_bytes()
    # the loss curve: steps 1-4 from the checkpoint's history, 5-12 trained again, the same values throughout

    def curve(p: Path) -> list[tuple[int, float, float]]:
        return [(e["step"], e["loss"], e["grad_norm"]) for e in json.loads((p / "loss.json").read_text())]

    assert curve(build) == curve(healed["build"])
    assert not work.exists()


# ------------------------------------------------------------------------------------------------ Qwen3.5 hybrid

def make_qwen35(dest: Path, tokenizer_from: Path) -> Path:
    """A tiny multimodal Qwen3.5 (3 Gated DeltaNet layers, 1 full-attention layer, a vision tower, MTP tensors as
    the Hub ships them) with a small fast tokenizer."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer, Qwen3_5Config, Qwen3_5ForConditionalGeneration
    text = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
                num_key_value_heads=1, head_dim=32, linear_key_head_dim=16, linear_value_head_dim=16,
                linear_num_key_heads=2, linear_num_value_heads=4, tie_word_embeddings=False,
                layer_types=["linear_attention"] * 3 + ["full_attention"])
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=1)
    torch.manual_seed(3)
    model = Qwen3_5ForConditionalGeneration(Qwen3_5Config(text_config=text, vision_config=vision,
                                                          tie_word_embeddings=False))
    model.to(torch.bfloat16).save_pretrained(dest)
    tensors = load_file(dest / "model.safetensors")
    g = torch.Generator().manual_seed(3)
    for name, shape in (("mtp.fc.weight", (64, 128)), ("mtp.norm.weight", (64,))):
        tensors[name] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(dest)
    # a processor config, as multimodal checkpoints ship one: the heal must use the tokenizer, never the processor
    (dest / "preprocessor_config.json").write_text(json.dumps({"processor_class": "Qwen3VLProcessor",
                                                               "image_processor_type": "Qwen2VLImageProcessorFast"}))
    return dest


def test_qwen35_hybrid_heals_with_lora_on_linear_attention(stores: Path, tiny_llama: Path) -> None:
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import Qwen3_5ForConditionalGeneration

    from steps.heal import check_model
    model = make_qwen35(stores / "qwen", tiny_llama)
    path = recipe(stores, model, name="hybrid", template=CHATML, dtype="bfloat16", heal="""\
heal:
  compute_dtype: float32
  lora: {r: 4, alpha: 8}
  train: {learning_rate: 1.0e-3, warmup_steps: 0, batch_size: 1, grad_accum: 2, max_steps: 3, max_length: 128,
          save_steps: 2, logging_steps: 1}
  data:
    - {path: data/chat.jsonl}
    - {text: data/heal.txt}
""")
    target = run_heal(path)
    record = target["heal"]
    linear_attn = ["linear_attn.in_proj_a", "linear_attn.in_proj_b", "linear_attn.in_proj_qkv",
                   "linear_attn.in_proj_z", "linear_attn.out_proj"]
    full_attn = ["self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"]
    mlp = ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"]
    assert record["target_modules"] == sorted(linear_attn + full_attn + mlp)
    assert record["lora_modules"] == 3 * 5 + 4 + 4 * 3
    build = stores / "build" / "hybrid"
    with safe_open(build / "adapter" / "adapter_model.safetensors", "pt") as f:
        modules = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in f.keys()}
    prefix = "model.language_model.layers"
    assert modules == ({f"{prefix}.{i}.{n}" for i in range(3) for n in linear_attn + mlp}
                       | {f"{prefix}.3.{n}" for n in full_attn + mlp})
    # the healed model keeps every tensor of the merged one (vision tower, MTP), names and dtypes unchanged
    with safe_open(build / "merged" / "model.safetensors", "pt") as m, \
            safe_open(build / "healed" / "model.safetensors", "pt") as h:
        assert set(m.keys()) == set(h.keys())
        assert any(k.startswith("mtp.") for k in h.keys()) and any(k.startswith("model.visual.") for k in h.keys())
        changed = {k for k in m.keys() if not torch.equal(m.get_tensor(k), h.get_tensor(k))}
        assert all(k.removesuffix(".weight") in modules for k in changed) and changed
        assert h.get_tensor(f"{prefix}.0.linear_attn.in_proj_qkv.weight").dtype == torch.bfloat16
    # and it loads: the healed model's logits are the merged model's with the adapter applied (bf16 weights, fp32 math)
    ids = torch.randint(3, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        healed_logits = Qwen3_5ForConditionalGeneration.from_pretrained(build / "healed", dtype=torch.float32)(
            input_ids=ids).logits
        peft_model = PeftModel.from_pretrained(
            Qwen3_5ForConditionalGeneration.from_pretrained(build / "merged", dtype=torch.float32), build / "adapter")
        expected = peft_model(input_ids=ids).logits
    assert torch.equal(healed_logits.argmax(-1), expected.argmax(-1))
    assert (healed_logits - expected).abs().max() < 0.05 * expected.abs().max()
    # layers: [start, end) puts LoRA around the seam only
    path.write_text(path.read_text().replace("lora: {r: 4, alpha: 8}", "lora: {r: 4, alpha: 8, layers: [2, 4], "
                                             "target_modules: [in_proj_qkv, out_proj, o_proj]}"))
    targets = check_model(stages(path)["heal"])
    assert targets.modules == (f"{prefix}.2.linear_attn.in_proj_qkv", f"{prefix}.2.linear_attn.out_proj",
                               f"{prefix}.3.self_attn.o_proj")


# ------------------------------------------------------------------------------------------------ data parallel

def test_data_parallel_through_a_launcher(stores: Path, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MERGEFORGE_HEAL_LAUNCH runs the training under a launcher: two processes (DDP over gloo on the CPU, as
    accelerate launch or torchrun would on GPUs), each taking its share of every step's examples."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    monkeypatch.setenv("MERGEFORGE_HEAL_LAUNCH", f"{sys.executable} -m torch.distributed.run --standalone "
                       "--nproc_per_node 2")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")           # two processes on the CPU, wherever this runs
    path = recipe(stores, tiny_llama, HEAL.replace("max_steps: 12", "max_steps: 3").replace("save_steps: 4",
                                                                                          "save_steps: 2"))
    record = run_heal(path)["heal"]
    assert record["world_size"] == 2 and record["steps"] == 3
    build = stores / "build" / "tiny"
    one_process_at_most = 3 * 2 * 2 * 96                      # steps x batch_size x grad_accum x max_length
    assert record["tokens_trained"] > one_process_at_most     # every process's examples counted
    losses = json.loads((build / "loss.json").read_text())
    assert [e["step"] for e in losses] == [1, 2, 3]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(build / "merged"), build / "adapter")
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


# ------------------------------------------------------------------------------------------------ dry run

def test_dry_run_loads_everything_and_trains_nothing(healed: dict[str, Any]) -> None:
    env = {**os.environ, "MERGEFORGE_BUILD": str(healed["build"].parent), "MERGEFORGE_STORE": str(healed["store"]),
           "MERGEFORGE_THREADS": "1"}
    before = sorted(p.name for p in healed["store"].rglob("*"))
    proc = subprocess.run([sys.executable, "-m", "steps.heal", str(healed["recipe"]), "--dry-run"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"heal:tiny: LlamaForCausalLM on (cpu|cuda:0), nf4 \+ double quantization, compute float32", out)
    assert "trainable parameters: 131,072 of" in out, out
    assert "data data/chat.jsonl: 24 read" in out and "memory estimate (" in out and "nothing trained" in out
    assert sorted(p.name for p in healed["store"].rglob("*")) == before        # the token cache was reused
