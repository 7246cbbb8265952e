"""The training run: the examples in their seeded order, transformers' Trainer on peft's LoRA with marked
checkpoints and a progress callback, resumption from the newest complete checkpoint. Runs in build's process or in
each process of a launcher (``python -m steps.heal train <job.json>``)."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from steps.heal.model import Targets, add_lora, count_parameters, device_name, load_model

logger = logging.getLogger(__name__)

DONE_MARKER = "mergeforge-complete"


def training_order(n_examples: int, needed: int, seed: int) -> list[int]:
    """The examples in the order training reads them: per-epoch permutations (seeded) until ``needed``."""
    import numpy as np
    order: list[int] = []
    epoch = 0
    while len(order) < needed:
        order += np.random.default_rng([seed, 1 + epoch]).permutation(n_examples).tolist()
        epoch += 1
    return order[:needed]


def train(job: dict[str, Any]) -> None:
    """Train the adapter described by a job (written by build()): in build's own process, or in each process
    of a launcher such as `accelerate launch`. Writes <work>/final/ (adapter) and <work>/result.json (main
    process)."""
    import numpy as np
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    params, work = job["params"], Path(job["work"])
    t = params["train"]
    device = device_name()
    if device == "cpu":                     # MERGEFORGE_THREADS shared by the processes a launcher starts here
        local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(max(1, int(job.get("threads") or 1) // local))
    with np.load(job["tokens"], allow_pickle=False) as z:
        ids, mask, starts = z["ids"], z["mask"], z["starts"]
    targets = Targets(job["targets"]["prefix"], tuple(job["targets"]["modules"]), tuple(job["targets"]["names"]),
                      tuple(job["targets"]["layers"]))
    model = add_lora(params, load_model(params, Path(job["merged"]), device), targets)
    args = TrainingArguments(
        output_dir=str(work / "checkpoints"), max_steps=t["max_steps"], per_device_train_batch_size=t["batch_size"],
        gradient_accumulation_steps=t["grad_accum"], learning_rate=t["learning_rate"],
        lr_scheduler_type=t["schedule"], warmup_steps=t["warmup_steps"], weight_decay=t["weight_decay"],
        max_grad_norm=t["max_grad_norm"], logging_steps=t["logging_steps"], logging_first_step=True,
        save_strategy="steps", save_steps=t["save_steps"], save_total_limit=2, seed=t["seed"], data_seed=t["seed"],
        report_to="none", disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False,
        use_cpu=device == "cpu", optim="adamw_torch", ddp_find_unused_parameters=False,
        dataloader_pin_memory=device != "cpu")
    world = max(1, args.world_size)
    per_step = t["batch_size"] * t["grad_accum"] * world
    order = training_order(len(starts) - 1, t["max_steps"] * per_step, t["seed"])
    lengths = np.diff(starts)
    step_tokens = lengths[np.asarray(order, dtype=np.int64)].reshape(t["max_steps"], per_step).sum(axis=1)
    pad_id = job["pad_id"]

    class Examples(torch.utils.data.Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return len(order)

        def __getitem__(self, i: int) -> dict[str, Any]:
            k = order[i]
            return {"ids": ids[starts[k]:starts[k + 1]], "mask": mask[starts[k]:starts[k + 1]]}

    def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
        width = max(len(b["ids"]) for b in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for r, b in enumerate(batch):
            n = len(b["ids"])
            row = torch.from_numpy(b["ids"].astype(np.int64))
            input_ids[r, :n] = row
            labels[r, :n] = torch.where(torch.from_numpy(b["mask"].astype(bool)), row, torch.tensor(-100))
            attention[r, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}

    class HealTrainer(Trainer):
        mark: tuple[float, int] = (0.0, 0)

        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            return torch.utils.data.SequentialSampler(train_dataset if train_dataset is not None
                                                      else self.train_dataset)

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            if "loss" in logs:
                now, step = time.perf_counter(), self.state.global_step
                seconds, tokens = now - self.mark[0], int(step_tokens[self.mark[1]:step].sum())
                logs["tokens_per_second"] = round(tokens / seconds, 1) if seconds > 0 else 0.0
                self.mark = (now, step)
            super().log(logs, start_time)

    class Checkpoints(TrainerCallback):
        """Marks a checkpoint complete once the Trainer has written all of it (a kill mid-save leaves it
        unmarked, and the next run resumes from the one before)."""

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.is_world_process_zero:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                (folder / DONE_MARKER).write_text(json.dumps({"step": state.global_step}) + "\n")
                logger.info("%s: checkpoint at step %d", job["stage"], state.global_step)

    progress = _Progress(job["stage"], t["max_steps"], job["resume_step"])
    trainer = HealTrainer(model=model, args=args, train_dataset=Examples(), data_collator=collate,
                          callbacks=[Checkpoints(), progress, *EXTRA_CALLBACKS])
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    started = time.perf_counter()
    trainer.mark = (started, job["resume_step"])
    if job["resume"]:
        logger.info("%s: resuming from %s (step %d of %d)", job["stage"], Path(job["resume"]).name,
                    job["resume_step"], t["max_steps"])
    trainer.train(resume_from_checkpoint=job["resume"])
    if trainer.is_world_process_zero():
        final = work / "final"
        shutil.rmtree(final, ignore_errors=True)
        trainer.model.save_pretrained(final)
        trainable, total = count_parameters(trainer.model)
        losses = [{"step": e["step"], "loss": e["loss"], "learning_rate": e.get("learning_rate"),
                   "grad_norm": e.get("grad_norm"), "tokens_per_second": e.get("tokens_per_second")}
                  for e in trainer.state.log_history if "loss" in e]
        result = {"losses": losses, "trainable": trainable, "total": total, "resumed_from": job["resume_step"],
                  "seconds": round(time.perf_counter() - started, 3), "world_size": world, "device": device,
                  "steps": trainer.state.global_step,
                  "tokens_trained": int(step_tokens[job["resume_step"]:trainer.state.global_step].sum())}
        tmp = work / "result.json.tmp"
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, work / "result.json")


EXTRA_CALLBACKS: list[Any] = []      # more TrainerCallbacks (tests use one to stop a run at a given step)


class _Progress:
    """Step, loss, tokens/s and ETA: a tqdm bar on a terminal, a log line every logging_steps elsewhere."""

    def __new__(cls, *args: Any) -> Any:       # a TrainerCallback, made here so that importing this module is cheap
        from transformers import TrainerCallback

        class Progress(TrainerCallback):
            def __init__(self, name: str, max_steps: int, start: int) -> None:
                self.name, self.max_steps, self.start = name, max_steps, start
                self.bar: Any = None
                self.began = 0.0
                self.tty = sys.stderr.isatty()

            def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                self.began = time.perf_counter()
                if self.tty and state.is_world_process_zero:
                    from tqdm import tqdm
                    self.bar = tqdm(total=self.max_steps, initial=self.start, desc=self.name, unit="step")

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                if self.bar is not None:
                    self.bar.update(state.global_step - self.bar.n)

            def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
                if not state.is_world_process_zero or not logs or "loss" not in logs:
                    return
                if self.bar is not None:
                    self.bar.set_postfix(loss=f"{logs['loss']:.4f}", tok_s=f"{logs.get('tokens_per_second', 0):.0f}")
                    return
                done = state.global_step - self.start
                eta = (time.perf_counter() - self.began) / done * (self.max_steps - state.global_step) if done else 0
                grad = logs.get("grad_norm")
                logger.info("%s: step %d/%d loss %.4f lr %.3g grad %s %.0f tok/s eta %s", self.name,
                            state.global_step, self.max_steps, logs["loss"], logs.get("learning_rate", 0),
                            f"{grad:.3g}" if grad is not None else "-", logs.get("tokens_per_second", 0),
                            _duration(eta))

            def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                if self.bar is not None:
                    self.bar.close()

        return Progress(*args)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def latest_checkpoint(folder: Path) -> tuple[Path | None, int]:
    """The newest checkpoint the Trainer finished writing (marked), and its step; unmarked ones (a kill during a
    save) are removed."""
    best: tuple[int, Path] | None = None
    for path in folder.glob("checkpoint-*") if folder.is_dir() else ():
        m = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if not m or not path.is_dir():
            continue
        if not (path / DONE_MARKER).is_file():
            shutil.rmtree(path, ignore_errors=True)
            continue
        if best is None or int(m.group(1)) > best[0]:
            best = (int(m.group(1)), path)
    return (best[1], best[0]) if best else (None, 0)
