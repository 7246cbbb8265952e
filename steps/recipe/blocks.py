"""The recipe's smaller blocks: gguf (declared as a Field table), imatrix and bench (a text file and how much of it
to read), quantize (type names or llama-quantize's per-tensor options) and publish (the Hub repositories)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from steps.constants import GGUF_OUTTYPES, MMPROJ_MODES, MTP_MODES, QUANT_TYPES
from steps.recipe.fields import REQUIRED, Checker, Field, did_you_mean
from steps.recipe.sources import _hub_repo

GGUF = {
    "outtype":        Field("choice", "bf16", choices=GGUF_OUTTYPES),
    "mtp":            Field("choice", "auto", choices=MTP_MODES),
    "mmproj":         Field("choice", "auto", choices=MMPROJ_MODES, yaml_bools=("off", "auto")),
    "mmproj_outtype": Field("choice", "f16", choices=GGUF_OUTTYPES),
    "split_max_size": Field("any"),                 # a size such as 50G (llama-gguf-split's form); absent: no split
}
IMATRIX = {
    "calibration": Field("any", REQUIRED),          # a calibration text file, relative to the recipe
    "chunks":      Field("int", 32, lo=1),
    "context":     Field("int", 512, lo=1),
}
BENCH = {
    "heldout": Field("any", REQUIRED),              # a held-out text file for perplexity, relative to the recipe
    "context": Field("int", 512, lo=1),
    "chunks":  Field("int", 8, lo=1),
}
QUANT_KEYS = ("type", "name", "tensor_type", "output_tensor_type", "token_embedding_type", "override_kv")
TENSOR_TYPES = ("f32", "f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k",
                "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq1_s", "iq1_m", "iq4_nl", "iq4_xs", "tq1_0",
                "tq2_0", "mxfp4")
MAX_CONTEXT = 1 << 20
PUBLISH_KEYS = ("model", "gguf", "quants", "variant", "split_bytes", "private", "license")
PUBLISH_VARIANTS = ("merged", "healed")
PUBLISH_SPLIT_BYTES = 50_000_000_000      # the Hub's largest file: GGUFs above it are split with llama-gguf-split


def gguf_block(check: Checker, value: Any) -> dict[str, Any]:
    gguf = check.block(value, "gguf", GGUF)
    if gguf["split_max_size"] is None:
        del gguf["split_max_size"]
    elif not (isinstance(gguf["split_max_size"], str) and re.fullmatch(r"[1-9][0-9]*[MG]", gguf["split_max_size"])):
        raise check.fail("gguf.split_max_size", f"expected a size such as 50G or 500M (llama-gguf-split's form), "
                         f"got {gguf['split_max_size']!r}")
    return gguf


def text_block(check: Checker, value: Any, section: str, fields: dict[str, Field], file_key: str, what: str,
               base: Path) -> tuple[dict[str, Any] | None, Path | None]:
    """A block that names a text file and how many chunks of how many tokens to read from it."""
    if value is None:
        return None, None
    given = check.mapping(value, section, tuple(fields))
    if file_key not in given:
        raise check.fail(f"{section}.{file_key}", f"missing; name {what}, relative to the recipe")
    path = check.existing_file(given[file_key], f"{section}.{file_key}", base)
    spec = check.block(given, section, fields)
    if spec["context"] > MAX_CONTEXT:
        raise check.fail(f"{section}.context", f"{spec['context']} tokens is beyond any model's context here "
                         f"(at most {MAX_CONTEXT}); use the model's training context or less")
    size = path.stat().st_size
    if size == 0:
        raise check.fail(f"{section}.{file_key}", f"{path} is empty; give {what}")
    # a token covers at least one byte, plus BOS/EOS: fewer bytes than this can never be enough
    needed = 2 * spec["context"]
    if size + 2 < needed:
        raise check.fail(f"{section}.context", f"{path} holds {size} bytes, at most {size + 2} tokens; llama.cpp "
                         f"needs 2 x context = {needed} tokens for one chunk: use a longer text or a context of "
                         f"at most {max(1, (size + 2) // 2)}")
    return spec, path


def _quantize(check: Checker, value: Any) -> dict[str, dict[str, Any]]:
    """Quant targets by name: a type name (``Q4_K_M``) or a mapping with llama-quantize's per-tensor options
    (``{name: Q4_K_L, type: Q4_K_M, output_tensor_type: q8_0, token_embedding_type: q8_0}``)."""
    if not isinstance(value, list):
        raise check.fail("quantize", f"expected a list of llama.cpp types such as [Q4_K_M, Q8_0], got {value!r}")
    out: dict[str, dict[str, Any]] = {}
    for i, entry in enumerate(value):
        key = f"quantize[{i}]"
        spec = dict(check.mapping(entry, key, QUANT_KEYS)) if isinstance(entry, dict) else {"type": entry}
        qtype = spec.get("type")
        if not isinstance(qtype, str) or qtype.upper() not in QUANT_TYPES:
            hint = did_you_mean(str(qtype).upper(), QUANT_TYPES)
            where = f"{key}.type" if isinstance(entry, dict) else key
            raise check.fail(where, f"unknown quant type {qtype!r}{hint}; known: {', '.join(QUANT_TYPES)}")
        spec["type"] = qtype.upper()
        name = spec.pop("name", spec["type"])
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.]{1,32}", name):
            raise check.fail(f"{key}.name", f"expected 1 to 32 letters, digits, '_' or '.' (it names the file "
                             f"<recipe>-<name>.gguf), got {name!r}")
        for opt in ("output_tensor_type", "token_embedding_type"):
            if opt in spec:
                spec[opt] = _tensor_type(check, spec[opt], f"{key}.{opt}")
        if "tensor_type" in spec:
            rules = spec["tensor_type"]
            if not isinstance(rules, list) or not rules:
                raise check.fail(f"{key}.tensor_type", "expected a list of 'pattern=type' rules, e.g. "
                                 "['attn_v=q8_0', 'ffn_down=q6_k']")
            for j, rule in enumerate(rules):
                if not isinstance(rule, str) or rule.count("=") != 1 or not rule.split("=")[0]:
                    raise check.fail(f"{key}.tensor_type[{j}]", f"expected 'pattern=type', got {rule!r}")
                pattern, ttype = rule.split("=")
                rules[j] = f"{pattern}={_tensor_type(check, ttype, f'{key}.tensor_type[{j}]')}"
        if "override_kv" in spec:
            kvs = spec["override_kv"]
            if not isinstance(kvs, list) or not all(isinstance(kv, str) and re.fullmatch(
                    r"[A-Za-z0-9_.]+=(int|float|bool|str):.*", kv) for kv in kvs):
                raise check.fail(f"{key}.override_kv", "expected a list of 'KEY=TYPE:VALUE' strings (TYPE: int, "
                                 f"float, bool or str), as llama-quantize --override-kv takes them; got {kvs!r}")
        if name.upper() in (n.upper() for n in out):
            raise check.fail(key, f"{name} is listed twice; give the second one its own name:")
        out[name] = spec
    return out


def _tensor_type(check: Checker, value: Any, key: str) -> str:
    if not isinstance(value, str) or value.lower() not in TENSOR_TYPES:
        hint = did_you_mean(str(value).lower(), TENSOR_TYPES)
        raise check.fail(key, f"unknown tensor type {value!r}{hint}; one of {', '.join(TENSOR_TYPES)}")
    return value.lower()


def publish_block(check: Checker, value: Any, quantize: tuple[str, ...], gguf: dict[str, Any],
             heal: dict[str, Any] | None) -> dict[str, Any] | None:
    """The publish: block (`doit publish:<recipe>`): the Hub repositories for the safetensors model and the GGUFs,
    which GGUFs (the unquantized one by its outtype, e.g. BF16, and quant names), normalized with defaults."""
    if value is None:
        return None
    spec = dict(check.mapping(value, "publish", PUBLISH_KEYS))
    if "model" not in spec and "gguf" not in spec:
        raise check.fail("publish", "name a Hub repository: model: org/name (the safetensors model) and/or gguf: "
                         "org/name-GGUF (the GGUF files)")
    for k in ("model", "gguf"):
        if k in spec:
            _hub_repo(check, spec[k], f"publish.{k}")
    if "model" in spec and spec.get("model") == spec.get("gguf"):
        raise check.fail("publish.gguf", f"is also publish.model ({spec['model']}); give the GGUFs a repository of "
                         "their own, e.g. org/name-GGUF")
    names = [gguf["outtype"].upper(), *quantize]
    quants = spec.setdefault("quants", names)
    if not isinstance(quants, list) or not quants:
        raise check.fail("publish.quants", f"expected a list of GGUFs to upload, from {', '.join(names)}")
    for i, q in enumerate(quants):
        found = next((n for n in names if isinstance(q, str) and n.upper() == q.upper()), None)
        if found is None:
            raise check.fail(f"publish.quants[{i}]", f"unknown GGUF {q!r}{did_you_mean(str(q), names)}; one of "
                             f"{', '.join(names)} ({names[0]} is the unquantized GGUF)")
        quants[i] = found
    variant = spec.setdefault("variant", "healed" if heal is not None else "merged")
    if variant not in PUBLISH_VARIANTS or (variant == "healed" and heal is None):
        raise check.fail("publish.variant", f"expected {' or '.join(PUBLISH_VARIANTS)}, got {variant!r}"
                         + ("; healed needs a heal: block" if variant == "healed" else ""))
    split = check.positive_int(spec.setdefault("split_bytes", PUBLISH_SPLIT_BYTES), "publish.split_bytes")
    if split < 1_000_000:
        raise check.fail("publish.split_bytes", f"{split} is below 1000000; llama-gguf-split splits by whole MB")
    check.typed(spec.setdefault("private", True), "publish.private", bool, "true or false")
    if "license" in spec and not (isinstance(spec["license"], str) and re.fullmatch(r"[a-z0-9][a-z0-9.+-]*",
                                                                                   spec["license"])):
        raise check.fail("publish.license", f"expected a Hub license id such as apache-2.0 or other, got "
                         f"{spec['license']!r}")
    return spec



GATES = {   # the bar a GGUF must clear to be published; each figure as the scoreboard shows it
    "ppl_ratio_max": Field("number", lo=0, lo_open=True),     # a quant's PPL over its unquantized GGUF's
    "kld_mean_max":  Field("number", lo=0),                   # a quant's mean KL-divergence from the unquantized GGUF
    "same_top_min":  Field("number", lo=0, hi=100),           # % of tokens where the quant's top token is the same
    "score_min":     Field("number", lo=0, hi=100),           # % of the evaluated tests passed
    "category_min":  Field("mapping"),                        # category -> tests passed in it
}
BENCH_GATES = ("ppl_ratio_max", "kld_mean_max", "same_top_min")
EVAL_GATES = ("score_min", "category_min")


def gates_block(check: Checker, value: Any, *, bench: bool, evals: dict[str, Any] | None) -> dict[str, Any] | None:
    """The gates: block: only the gates given (each needs the block that measures its figure: bench: for PPL, KLD
    and the same-top rate, eval: for the scores); category_min's names must be categories the eval runs."""
    if value is None:
        return None
    spec = {k: v for k, v in check.block(value, "gates", GATES, fill=False).items() if v is not None}
    if not spec:
        raise check.fail("gates", f"expected at least one gate: {', '.join(GATES)}")
    for key in spec:
        if key in BENCH_GATES and not bench:
            raise check.fail(f"gates.{key}", "needs a bench: block (held-out text for PPL and KLD) to measure it; "
                             "add one, or remove the gate")
        if key in EVAL_GATES and evals is None:
            raise check.fail(f"gates.{key}", "needs an eval: block (the capability suite) to measure it; add one, "
                             "or remove the gate")
    if "category_min" in spec:
        from steps.evalsuite import all_tests
        assert evals is not None
        run = {t.category: 0 for t in all_tests(evals["categories"], evals["tests"])}
        for t in all_tests(evals["categories"], evals["tests"]):
            run[t.category] += 1
        if not spec["category_min"]:
            raise check.fail("gates.category_min", "expected a mapping of categories to the tests each must pass, "
                             "e.g. {tools: 5}")
        for name, minimum in spec["category_min"].items():
            where = f"gates.category_min.{name}"
            if name not in run:
                raise check.fail(where, f"{name!r} is not a category the eval runs{did_you_mean(str(name), list(run))}"
                                 f"; one of {', '.join(run)}")
            check.value(Field("int", lo=0, hi=run[name], what=f"a number of tests from 0 to {run[name]} (the "
                              f"eval runs {run[name]} {name} tests)"), minimum, where)
    return spec
