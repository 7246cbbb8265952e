"""The model side of the heal: the merged model's transformers class and decoder blocks, the LoRA targets
(checked against its module tree on the meta device), loading it quantized for training, adding LoRA, counting
parameters."""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steps.errors import StepFailed
from steps.heal.paths import _fail, merged_dir

if TYPE_CHECKING:
    from steps.stage import Stage

ASIDE = ("visual", "vision", "mtp", "encoder", "audio")     # numbered blocks that are not the text decoder


def model_class(model_dir: Path) -> Any:
    """The transformers class the model's config names (a multimodal model's own class, so the adapter's module
    names are those a user loads), else AutoModelForCausalLM."""
    import transformers
    config = json.loads((model_dir / "config.json").read_text())
    for name in config.get("architectures") or ():
        cls = getattr(transformers, str(name), None)
        if cls is not None and hasattr(cls, "from_pretrained"):
            return cls
    return transformers.AutoModelForCausalLM


def decoder_prefix(model: Any, n_layers: int) -> str:
    """The module path of the text decoder's blocks: the ModuleList of n_layers blocks, preferring one named
    layers that is not a vision tower, encoder or MTP head."""
    import torch
    found = [name for name, mod in model.named_modules()
             if isinstance(mod, torch.nn.ModuleList) and len(mod) == n_layers and name]
    if not found:
        raise ValueError(f"no module list of {n_layers} blocks (the config's layer count) in {type(model).__name__}")
    return max(found, key=lambda p: (p.rsplit(".", 1)[-1] == "layers", not any(a in p for a in ASIDE), -len(p)))


@dataclass(frozen=True)
class Targets:
    prefix: str                      # e.g. model.layers
    modules: tuple[str, ...]         # full module names that get LoRA
    names: tuple[str, ...]           # their paths inside a block (self_attn.q_proj, ...), sorted
    layers: tuple[int, ...]

    @property
    def regex(self) -> str:
        """peft's target_modules as one regular expression (fullmatch) naming exactly these modules."""
        return (rf"{re.escape(self.prefix)}\.(?:{'|'.join(str(i) for i in self.layers)})\."
                rf"(?:{'|'.join(re.escape(n) for n in self.names)})")


def resolve_targets(stage_params: dict[str, Any], model: Any, n_layers: int, fail: Any) -> Targets:
    """The linear layers inside the decoder blocks that get LoRA: every one (auto) or those the recipe names,
    in the blocks lora.layers selects. ``fail(key, message)`` makes the RecipeError."""
    import torch
    from steps.recipe.fields import did_you_mean
    lora = stage_params["lora"]
    prefix = decoder_prefix(model, n_layers)
    rng = lora.get("layers")
    if rng is not None and rng[1] > n_layers:
        raise fail("heal.lora.layers", f"{rng} is outside the merged model, which has {n_layers} layers; use a "
                   f"range within [0, {n_layers}]")
    layers = list(range(*rng)) if rng is not None else list(range(n_layers))
    linear: dict[str, list[str]] = {}        # path inside a block -> full names
    others: dict[str, str] = {}              # non-linear module paths -> type
    for name, mod in model.named_modules():
        if not name.startswith(prefix + "."):
            continue
        rest = name[len(prefix) + 1:]
        if "." not in rest:
            continue
        index, rel = rest.split(".", 1)
        if not index.isdigit() or int(index) not in layers:
            continue
        if isinstance(mod, torch.nn.Linear):
            linear.setdefault(rel, []).append(name)
        else:
            others.setdefault(rel, type(mod).__name__)
    if not linear:
        raise fail("heal.lora.layers", f"no linear layer in blocks {layers[0]}..{layers[-1]} of {prefix}")
    wanted = lora["target_modules"]
    if wanted == "auto":
        chosen = sorted(linear)
    else:
        chosen = []
        leaves = sorted({rel.rsplit(".", 1)[-1] for rel in linear} | set(linear))
        for j, t in enumerate(wanted):
            hits = [rel for rel in linear if rel == t or rel.endswith("." + t)]
            if not hits:
                kind = next((typ for rel, typ in others.items() if rel == t or rel.endswith("." + t)), None)
                blocks = "the decoder blocks" if rng is None else f"decoder blocks {layers[0]}..{layers[-1]}"
                why = (f"{t!r} is a {kind}, not a linear layer" if kind else
                       f"no linear layer named {t!r} in {blocks}{did_you_mean(t, leaves)}")
                raise fail(f"heal.lora.target_modules[{j}]", f"{why}; the model's are: "
                           f"{', '.join(sorted({rel.rsplit('.', 1)[-1] for rel in linear}))} (or auto)")
            chosen += [h for h in hits if h not in chosen]
        chosen.sort()
    modules = tuple(sorted((n for rel in chosen for n in linear[rel]), key=_natural))
    used = sorted({int(n[len(prefix) + 1:].split(".", 1)[0]) for n in modules})
    return Targets(prefix, modules, tuple(chosen), tuple(used))


def _natural(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def skeleton(model_dir: Path) -> Any:
    """The model built from its config on the meta device (no weights, no memory): its module tree."""
    import torch
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        return model_class(model_dir)._from_config(config)


def check_model(stage: Stage) -> Targets:
    """lora.target_modules and lora.layers against the merged model's module tree (no weights read)."""
    from steps.tensors import source_layer_count
    model_dir = merged_dir(stage)
    n_layers = source_layer_count(model_dir)
    if n_layers is None:
        raise StepFailed(f"{stage.id}: {model_dir}/config.json has no layer count")
    return resolve_targets(stage.params, skeleton(model_dir), n_layers, lambda k, m: _fail(stage, k, m))


def device_name() -> str:
    """Where this process trains: its own CUDA device under a launcher (LOCAL_RANK), the first one, or the CPU."""
    import torch
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def load_model(params: dict[str, Any], model_dir: Path, device: str) -> Any:
    """The merged model for training: quantized as the recipe says (bitsandbytes NF4/int8, on ``device``) or in
    compute_dtype, every base weight frozen."""
    import torch
    from transformers import BitsAndBytesConfig
    dtype = getattr(torch, params["compute_dtype"])
    kwargs: dict[str, Any] = {"dtype": dtype}
    if params["quantization"] == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=params["double_quant"],
            bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=torch.uint8)
    elif params["quantization"] == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    if "quantization_config" in kwargs:
        kwargs["device_map"] = {"": device}
    model = model_class(model_dir).from_pretrained(model_dir, **kwargs)
    for p in model.parameters():
        p.requires_grad_(False)
    for cfg in (model.config, getattr(model.config, "text_config", None)):
        if cfg is not None and hasattr(cfg, "use_cache"):
            cfg.use_cache = False
    return model


def add_lora(params: dict[str, Any], model: Any, targets: Targets) -> Any:
    import transformers
    from peft import LoraConfig, get_peft_model
    lora, train = params["lora"], params["train"]
    if train["gradient_checkpointing"]:
        kwargs = {"use_reentrant": False}              # non-reentrant: works with frozen inputs and under DDP
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:                                           # transformers < 5.x's name
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.enable_input_require_grads()
    transformers.set_seed(train["seed"])          # LoRA's initial A matrices
    config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                        target_modules=targets.regex, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, all) parameters; a 4-bit weight counts its elements, not its packed bytes."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if type(p).__name__ == "Params4bit":
            n = math.prod(p.quant_state.shape) if getattr(p, "quant_state", None) is not None else 2 * n
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
