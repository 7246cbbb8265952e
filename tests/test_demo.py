"""The embedded demo, end to end, as a fresh clone builds it: SmolLM2-135M-Instruct from its registry package,
depth-upscaled, converted, imatrix'd, quantized and scored. Then the import is checked against llama.cpp."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, Workspace, generate

pytestmark = [pytest.mark.slow, pytest.mark.demo]

def remote_url(factory: pytest.TempPathFactory) -> str:
    return (factory.getbasetemp() / "demo-remote").as_uri()


CHAT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory, llama_cpp) -> Workspace:  # type: ignore[no-untyped-def]
    ws = Workspace(tmp_path_factory.mktemp("demo"))
    ws.recipes.symlink_to(ROOT / "recipes")
    first = ws.doit(env={"MERGEFORGE_REMOTE": remote_url(tmp_path_factory)})   # and push every key to a shared store
    from steps.plan import plan
    from steps.recipe import load
    assert sorted(first.executed) == sorted(st.id for st in plan(load(ROOT / "recipes" / "demo.yaml")))
    return ws


def test_demo_builds_and_scores(demo: Workspace, llama_cpp) -> None:  # type: ignore[no-untyped-def]
    out = demo.build / "demo"
    board = json.loads((out / "scoreboard.json").read_text())
    rows = {r["type"]: r for r in board["models"] if r["variant"] == "demo"}
    assert set(rows) == {"base", "Q4_K_M", "Q8_0"}
    for qtype in ("Q4_K_M", "Q8_0"):
        assert 1 < rows[qtype]["ppl"] < 100 and 0 < rows[qtype]["kld_mean"] < 1
    assert rows["Q8_0"]["kld_mean"] < rows["Q4_K_M"]["kld_mean"]
    assert rows["Q4_K_M"]["size"] < rows["Q8_0"]["size"] < rows["base"]["size"]
    config = json.loads((out / "merged" / "config.json").read_text())
    assert config["num_hidden_layers"] == 40
    text = generate(llama_cpp.program("llama-completion"), out / "demo-Q4_K_M.gguf", CHAT, n=12)
    assert "Paris" in text, text
    assert demo.doit().executed == []


def test_a_second_checkout_restores_the_whole_demo_from_the_remote(
        demo: Workspace, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Another path, its own empty local store, the same MERGEFORGE_REMOTE (a file:// directory): `doit` builds
    no stage; every one is pulled (each file's digest checked), and lock.json agrees with the first checkout."""
    other = Workspace(tmp_path_factory.mktemp("demo-elsewhere"))
    other.recipes.symlink_to(ROOT / "recipes")
    done = other.doit(env={"MERGEFORGE_REMOTE": remote_url(tmp_path_factory)})
    events = other.events("demo")
    assert events and {e["action"] for e in events} == {"pulled"}, sorted({(e["stage"], e["action"]) for e in events})
    assert sorted(done.executed) == sorted(e["stage"] for e in events)
    mine = json.loads((demo.build / "demo" / "lock.json").read_text())
    theirs = json.loads((other.build / "demo" / "lock.json").read_text())
    assert theirs["stages"] == mine["stages"]
    assert {k: v["digest"] for k, v in theirs["artifacts"].items()} == \
        {k: v["digest"] for k, v in mine["artifacts"].items()}
    assert "0 bad" in other.doit("verify").output


def test_demo_heal_closes_part_of_the_seam(demo: Workspace) -> None:
    """The healed variant: a falling loss, and a held-out PPL below the raw merge's, for the unquantized GGUF and
    for every quant."""
    out = demo.build / "demo"
    board = json.loads((out / "scoreboard.json").read_text())
    assert board["variants"] == ["demo-source-smollm2", "demo", "demo-healed"]
    rows = {(r["variant"], r["type"]): r for r in board["models"]}
    for qtype in ("base", "Q4_K_M", "Q8_0"):
        assert rows[("demo-healed", qtype)]["ppl"] < rows[("demo", qtype)]["ppl"], qtype
    # the stack costs the source's quality, which the heal wins back in part
    for qtype in ("base", "Q4_K_M"):
        assert rows[("demo-source-smollm2", qtype)]["ppl"] < rows[("demo", qtype)]["ppl"], qtype
    assert ("demo-source-smollm2", "Q8_0") not in rows          # a source gets the evaluated quants only
    losses = [e["loss"] for e in json.loads((out / "loss.json").read_text())]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    assert "| Figure | source smollm2 | raw merge | healed | Delta |" in (out / "scoreboard.md").read_text()
    assert (out / "scoreboard.png").read_bytes().startswith(b"\x89PNG")


def test_demo_evaluates_its_q4_k_m(demo: Workspace) -> None:
    """The source's and both variants' Q4_K_M through the 44-test suite against llama-server: every test ran and was
    graded (a 135M model fails most of them)."""
    out = demo.build / "demo"
    for name in ("demo-source-smollm2-Q4_K_M", "demo-Q4_K_M", "demo-healed-Q4_K_M"):
        report = json.loads((out / f"{name}.eval.json").read_text())
        assert report["total"] == 44 and all(t["reason"] for t in report["tests"])
        assert sum(report["statuses"].values()) == 44 and report["sandbox"] in ("bwrap", "rlimits")
        assert json.loads((out / f"{name}.timings.json").read_text())["tokens_per_s"] > 0
    rows = {(r["variant"], r["type"]): r for r in json.loads((out / "scoreboard.json").read_text())["models"]}
    assert rows[("demo", "Q4_K_M")]["eval"]["total"] == 44 == rows[("demo-healed", "Q4_K_M")]["eval"]["total"]


def test_imported_model_agrees_with_llama_cpp_on_the_original_gguf(demo: Workspace, tmp_path: Path) -> None:
    """The safetensors import (transformers) and llama.cpp on the packaged Q4_1 GGUF give the same distributions."""
    import torch
    from transformers import AutoModelForCausalLM

    from steps.bench import logprobs
    from steps.fetch import wheel
    from steps.recipe import load

    recipe = load(ROOT / "recipes" / "demo.yaml")
    import zipfile
    with zipfile.ZipFile(wheel(recipe.sources["smollm2"])) as zf:
        original = Path(zf.extract(recipe.sources["smollm2"].spec["file"], tmp_path))
    ref = logprobs(original, ROOT / "recipes" / "data" / "heldout.txt", {"context": 128, "chunks": 4},
                   tmp_path / "orig.logprobs")
    model = AutoModelForCausalLM.from_pretrained(demo.build / "demo" / "sources" / "smollm2", dtype=torch.float32)
    first = ref.n_ctx // 2
    klds, agree = [], []
    for c, (logp_ref, _targets) in enumerate(ref.chunks()):
        ids = torch.tensor(ref.tokens[c * ref.n_ctx:(c + 1) * ref.n_ctx], dtype=torch.long)[None]
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, first:ref.n_ctx - 1].float(), dim=-1).numpy()
        p_ref = np.exp(logp_ref)
        klds.append(np.sum(p_ref * (logp_ref - logp), axis=1))
        agree.append(np.argmax(logp, axis=1) == np.argmax(logp_ref, axis=1))
    kld, top1 = float(np.concatenate(klds).mean()), float(np.concatenate(agree).mean())
    # Measured here: KLD 0.0144, top-1 agreement 98.4 %, PPL 12.47 (transformers) vs 12.52 (llama.cpp). The gap is
    # llama.cpp's Q4_1 kernels (8-bit activations) against bf16 weights in float32 arithmetic.
    assert kld < 0.03 and top1 > 0.95, (kld, top1)


def test_imported_model_answers_in_transformers(demo: Workspace) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    src = demo.build / "demo" / "sources" / "smollm2"
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt")
    ids = ids if torch.is_tensor(ids) else ids["input_ids"]
    out = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert "The capital of France is Paris." in tok.decode(out[0][ids.shape[1]:])
