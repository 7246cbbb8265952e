"""Declarations, apart from logic: quant types, stage code versions, artifact names, GGUF provenance keys."""
from __future__ import annotations

from dataclasses import dataclass

# llama-quantize's type names (tools/quantize/quantize.cpp QUANT_OPTIONS), upper case as the recipe writes them.
QUANT_TYPES = (
    "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K",
    "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M",
    "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "MXFP4_MOE", "F16", "BF16", "F32",
)
# Types llama-quantize refuses to make without an importance matrix.
NEEDS_IMATRIX = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "Q2_K_S")
GGUF_OUTTYPES = ("bf16", "f16", "f32", "q8_0")
MTP_MODES = ("auto", "keep", "drop")
MMPROJ_MODES = ("auto", "off")

@dataclass(frozen=True)
class StageSpec:
    module: str                   # the module that declares the stage (STAGE = steps.stage.Declaration(...))
    version: int                  # bump when the stage's code changes what it writes: it is part of the key
    packages: tuple[str, ...]     # Python packages whose versions enter the key
    doc: str                      # what `doit list` says of the stage's task
    llama_cpp: bool = False       # runs llama.cpp programs: llama.cpp's version enters the key
    native: bool = False          # its bytes depend on the machine llama.cpp computes on (its CPU features, CUDA,
    #                               -ngl): toolchain.build_target() and MERGEFORGE_GPU_LAYERS enter the key


_TORCH = ("torch", "transformers", "safetensors", "gguf")
# Every kind of stage, in the order of the chain: a new stage is its module plus one entry here (and its place in
# steps/plan.py, the one place that knows the graph); dodo.py makes its doit task from this table.
STAGES = {
    "fetch": StageSpec("steps.fetch", 1, _TORCH, "pin each recipe's sources (local models by digest; Hub repos to a "
                       "locked commit; packaged GGUFs imported to safetensors)"),
    "merge": StageSpec("steps.merge", 1, ("torch", "safetensors"),
                       "merge the sources per the recipe's mergekit-style merge block (streamed safetensors)"),
    "heal": StageSpec("steps.heal", 1, ("torch", "transformers", "peft", "bitsandbytes", "safetensors"),
                      "the QLoRA heal fine-tune of the merged model (adapter, loss curve, healed 16-bit model)"),
    "convert": StageSpec("steps.convert", 2, _TORCH, "convert the merged model to a GGUF with llama.cpp's converter, "
                         "with provenance metadata", llama_cpp=True),
    "imatrix": StageSpec("steps.imatrix", 2, (), "compute an importance matrix with llama-imatrix on the recipe's "
                         "calibration text", llama_cpp=True, native=True),
    "quantize": StageSpec("steps.quantize", 1, (), "quantize the GGUF with llama-quantize, one subtask per type",
                          llama_cpp=True, native=True),
    "bench": StageSpec("steps.bench", 3, (), "size, perplexity and KL-divergence of each quant against the "
                       "unquantized GGUF, per variant", llama_cpp=True, native=True),
    "eval": StageSpec("steps.eval", 4, ("openai", "jsonschema", "html5lib", "tinycss2", "tree-sitter",
                                        "tree-sitter-javascript", "playwright", "pytest"),
                      "the capability suite against llama-server, one subtask per evaluated GGUF", llama_cpp=True,
                      native=True),
    "scoreboard": StageSpec("steps.scoreboard", 5, ("matplotlib",),
                            "every variant's figures side by side (scoreboard.json, scoreboard.md)"),
}

# Artifact names under build/<recipe>/.
SOURCES_DIR     = "sources"
MERGED_DIR      = "merged"
BF16_GGUF       = "{recipe}-{outtype}.gguf"
IMATRIX_FILE    = "{recipe}-imatrix.gguf"
QUANT_GGUF      = "{recipe}-{qtype}.gguf"
MMPROJ_GGUF     = "{recipe}-mmproj-{outtype}.gguf"
BENCH_FILE      = "{name}.bench.json"            # one per GGUF (flat: a directory of build/ belongs to one stage)
BENCH_LOGPROBS  = "{variant}.logprobs"            # the unquantized GGUF's log-probabilities, the KLD reference
EVAL_FILE       = "{name}.eval.json"             # one per evaluated GGUF, beside the server's log
EVAL_LOG        = "{name}.server.log"
EVAL_TIMINGS    = "{name}.timings.json"          # latency and tokens/s: measurements, kept out of eval.json
EVAL_PAGES      = "{name}.pages"                 # frontend tests: each generated page and its screenshot
SCOREBOARD      = "scoreboard.json"
SCOREBOARD_MD   = "scoreboard.md"
SCOREBOARD_PNG  = "scoreboard.png"
HEALED_DIR      = "healed"
HEALED_SUFFIX   = "-healed"
SOURCE_INFIX    = "-source-"                     # <recipe>-source-<name>: a source evaluated beside the merge
LOCK_FILE       = "lock.json"
MANIFEST_DIR    = ".mf"

# Provenance written into every GGUF the pipeline makes (llama-quantize copies them into the quants).
GGUF_KEY_RECIPE  = "mergeforge.recipe"
GGUF_KEY_STAGE   = "mergeforge.convert.key"
GGUF_KEY_SOURCES = "mergeforge.sources"
GGUF_KEY_VERSION = "mergeforge.version"

SCHEMA_VERSION = 1
SCOREBOARD_SCHEMA = 4
DEFAULT_SHARD_BYTES = 5_000_000_000
