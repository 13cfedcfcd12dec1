"""Deterministic trainer for the embedded model (CPU or GPU).

Samples come from the seeded world generator (seed = step * batch + i), so a run is fully
determined by its arguments. The loss covers answer tokens and the closing </s> only.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .embedded_model import build_model, save
from .scenes import KINDS, generate, held_out

IMAGE_MEAN, IMAGE_STD = 0.5, 0.25  # must equal the processor's settings (tested)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 3000
    batch_size: int = 128
    lr: float = 3e-4
    warmup: int = 200
    weight_decay: float = 0.01
    seed: int = 0
    eval_every: int = 250
    eval_samples: int = 500
    attn_implementation: str = "sdpa"
    init_from: str | None = None  # continue from these weights (a second, shorter stage)
    data_offset: int = 0  # first training seed = data_offset; later stages see fresh scenes


def pixel_values(images: list[np.ndarray]) -> torch.Tensor:
    """The processor's transform (no resize needed at the native 64 px), batched in numpy."""
    x = np.stack(images).astype(np.float32) / 255.0
    x = (x - IMAGE_MEAN) / IMAGE_STD
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


class Batcher:
    """Turns samples into padded (input_ids, labels, pixel_values) without the slow processor."""

    def __init__(self, processor, num_image_tokens: int) -> None:
        self.tokenizer = processor.tokenizer
        self.processor = processor
        self.image_block = " ".join(["<image>"] * num_image_tokens)

    def prompt_text(self, question: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                     "text": question}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def encode(self, samples) -> dict[str, torch.Tensor]:
        pad = self.tokenizer.pad_token_id
        rows, labels = [], []
        for s in samples:
            prompt = self.prompt_text(s.question).replace("<image>", self.image_block)
            p_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            a_ids = self.tokenizer(s.answer + " </s>", add_special_tokens=False)["input_ids"]
            rows.append(p_ids + a_ids)
            labels.append([-100] * len(p_ids) + a_ids)
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), pad)
        lab = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (r, lb) in enumerate(zip(rows, labels, strict=True)):
            ids[i, : len(r)] = torch.tensor(r)
            lab[i, : len(lb)] = torch.tensor(lb)
            mask[i, : len(r)] = 1
        return {"input_ids": ids, "labels": lab, "attention_mask": mask,
                "pixel_values": pixel_values([s.image for s in samples])}


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def exact_match(model, batcher: Batcher, samples, chunk: int = 128) -> np.ndarray:
    """Teacher-forced argmax equals the whole answer and </s>: exactly what greedy decoding
    would produce, at the cost of one forward."""
    model.eval()
    hits = []
    for i in range(0, len(samples), chunk):
        batch = batcher.encode(samples[i : i + chunk])
        labels = batch.pop("labels")
        logits = model(**batch).logits[:, :-1]
        target = labels[:, 1:]
        correct = (logits.argmax(-1) == target) | (target == -100)
        hits.append(correct.all(dim=1).numpy())
    model.train()
    return np.concatenate(hits)


def validation_set(n: int) -> list:
    return [generate(held_out(seed=999, index=i), KINDS[i % len(KINDS)]) for i in range(n)]


def train(cfg: TrainConfig, out: Path, log=print) -> dict:
    torch.manual_seed(cfg.seed)
    model, processor = build_model(cfg.seed)
    if cfg.init_from:
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(cfg.init_from,
                                                              local_files_only=True)
    model.set_attn_implementation(cfg.attn_implementation)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).train()
    batcher = Batcher(processor, model.config.vision_config.image_size ** 2
                      // model.config.vision_config.patch_size ** 2)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    val = validation_set(cfg.eval_samples)
    history, started = [], time.time()
    bar = tqdm(range(cfg.steps), desc="train", mininterval=5)
    for step in bar:
        first = cfg.data_offset + step * cfg.batch_size
        samples = [generate(first + i) for i in range(cfg.batch_size)]
        batch = {k: v.to(device) for k, v in batcher.encode(samples).items()}
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            acc = _report(model, batcher, val, step + 1, loss.item(), time.time() - started)
            history.append(acc)
            log(json.dumps(acc))
            save(model.to("cpu"), processor, out)
            model.to(device)
    summary = {"config": asdict(cfg), "history": history, "seconds": time.time() - started,
               "device": device}
    (out / "training.json").write_text(json.dumps(summary, indent=2))
    return summary


def _report(model, batcher, val, step, loss, seconds) -> dict:
    device = next(model.parameters()).device
    model.to("cpu")
    hits = exact_match(model, batcher, val)
    model.to(device)
    per_kind = {k: float(np.mean([h for h, s in zip(hits, val, strict=True) if s.kind == k]))
                for k in KINDS}
    return {"step": step, "loss": round(loss, 5), "accuracy": float(hits.mean()),
            "per_kind": per_kind, "seconds": round(seconds, 1)}
