"""The llama.cpp wrapper: clear failures, and a failing program never leaves an artifact behind."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import DATA, Workspace, llama_cpp_with_quantize
from steps import toolchain
from steps.errors import StepFailed, ToolNotFound


def test_failure_names_the_command_and_shows_the_tail() -> None:
    with pytest.raises(StepFailed) as info:
        toolchain.run(["sh", "-c", "echo loading; echo 'bad magic' >&2; exit 3"], what="quantize demo-Q4_K_M")
    text = str(info.value)
    assert "quantize demo-Q4_K_M failed (exit 3)" in text
    assert "command: sh -c" in text and "loading" in text and "bad magic" in text
    assert "nothing was written to build/" in text


def test_missing_program() -> None:
    with pytest.raises(ToolNotFound, match="no-such-program not found; run `doit toolchain`"):
        toolchain.run(["no-such-program"], what="imatrix demo")


def test_configured_directory_without_programs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MERGEFORGE_LLAMA_CPP", str(tmp_path))
    with pytest.raises(ToolNotFound, match="holds no llama-quantize"):
        toolchain.locate()


@pytest.mark.slow
def test_failing_quantize_leaves_nothing_in_build(workspace: Workspace, tiny_llama: Path, llama_cpp,  # type: ignore[no-untyped-def]
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A llama-quantize that writes half a file and fails: the build stops with its error, build/ has no quant,
    the store has no entry for it and its temporary directory is gone."""
    broken = llama_cpp_with_quantize(workspace.path / "broken-llama.cpp", llama_cpp,
                                     'for a; do case "$a" in *.gguf) out="$a";; esac; done\n'
                                     'head -c 1000 /dev/zero > "$out"; echo "simulated crash" >&2; exit 1')
    workspace.write_recipe("tiny", f"""
sources:
  a: {{path: {tiny_llama}}}
merge:
  merge_method: passthrough
  slices:
    - sources: [{{model: a, layer_range: [0, 4]}}]
quantize: [Q8_0]
bench: {{heldout: {DATA / 'heldout.txt'}, chunks: 2, context: 64}}
""")
    monkeypatch.setenv("MERGEFORGE_LLAMA_CPP", str(broken))
    result = workspace.doit(check=False)
    assert result.returncode != 0
    assert "quantize tiny-Q8_0 failed (exit 1)" in result.output and "simulated crash" in result.output
    assert not (workspace.build / "tiny" / "tiny-Q8_0.gguf").exists()
    assert not (workspace.build / "tiny" / ".mf" / "quantize.tiny-Q8_0.json").exists()
    assert not any((workspace.store / "tmp").iterdir())
    stages = {json.loads(p.read_text())["stage"] for p in (workspace.store / "store").glob("*/*/manifest.json")}
    # the stages that do not need the failed quant still built (doit runs with `continue`): the unquantized
    # reference bench among them; nothing of the quant and its bench
    assert stages == {"fetch:tiny", "merge:tiny", "convert:tiny", "bench:tiny"}
