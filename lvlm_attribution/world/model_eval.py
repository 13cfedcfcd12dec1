"""`model-eval`: does the embedded model answer correctly, and does it look at the evidence?

Accuracy: greedy generation on fresh held-out scenes (equal numbers per question kind), exact
match of the whole answer sentence. Evidence reliance: for every answer token, the LLR between
the original image and the same image with the evidence object(s) erased (painted over with fresh
background texture), teacher-forced on the correct answer:
    LLR_t = ln p(y_t | I, y_<t) - ln p(y_t | I_erased, y_<t).
Content tokens (decided by the image) should have a high LLR, filler tokens (decided by the
template or the question) about zero. Scenes whose evidence mask is empty (questions about absent
objects) have nothing to erase and are left out of the LLR statistics.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..engine import Explainer
from .scenes import KINDS, Sample, erase, generate, held_out


@dataclass(frozen=True)
class ModelEvalConfig:
    scenes: int = 1000
    seed: int = 0
    max_new_tokens: int = 12


def eval_samples(cfg: ModelEvalConfig) -> list[Sample]:
    return [generate(held_out(cfg.seed, i), KINDS[i % len(KINDS)]) for i in range(cfg.scenes)]


@torch.no_grad()
def answer_logprobs(explainer: Explainer, images: list[Image.Image], question: str,
                    answer_ids: list[int]) -> torch.Tensor:
    """(B, T) teacher-forced log p(y_t | image_b, prompt, y_<t) for a batch of images."""
    prompts = [explainer.prepare(img, question) for img in images]
    inputs = [explainer.adapter.teacher_forced_inputs(p, answer_ids) for p in prompts]
    batch = {k: torch.cat([x[k] for x in inputs]) for k in inputs[0]}
    logits = explainer.model(**batch).logits.float()
    start = prompts[0].prompt_length
    rows = torch.arange(start - 1, start - 1 + len(answer_ids))
    logp = torch.log_softmax(logits[:, rows], dim=-1)
    ids = torch.tensor(answer_ids)[None, :, None].expand(len(images), -1, -1)
    return logp.gather(2, ids)[..., 0]


def token_llrs(explainer: Explainer, sample: Sample) -> tuple[np.ndarray, list[bool]] | None:
    """LLR per answer word (original vs evidence erased); None when there is no evidence."""
    if not sample.evidence.any():
        return None
    ids = explainer.encode_answer(sample.answer)
    if len(ids) != len(sample.answer_words):
        raise ValueError("answer words and tokens are not aligned one to one")
    images = [Image.fromarray(sample.image),
              Image.fromarray(erase(sample.image, sample.evidence, seed=sample.seed))]
    logp = answer_logprobs(explainer, images, sample.question, ids)
    return (logp[0] - logp[1]).numpy(), sample.content


def run_model_eval(explainer: Explainer, cfg: ModelEvalConfig) -> dict:
    samples = eval_samples(cfg)
    correct = {k: [] for k in KINDS}
    content, filler = [], []
    failures = []
    for s in tqdm(samples, desc="model-eval", mininterval=2):
        ids = explainer.generate(Image.fromarray(s.image), s.question, cfg.max_new_tokens)
        answer = explainer.decode(ids)
        correct[s.kind].append(answer == s.answer)
        if answer != s.answer and len(failures) < 10:
            failures.append({"seed": s.seed, "question": s.question, "expected": s.answer,
                             "got": answer})
        result = token_llrs(explainer, s)
        if result is not None:
            llr, flags = result
            content += [float(v) for v, f in zip(llr, flags, strict=True) if f]
            filler += [float(v) for v, f in zip(llr, flags, strict=True) if not f]
    every = [c for kind in KINDS for c in correct[kind]]
    return {
        "scenes": cfg.scenes, "seed": cfg.seed, "model": explainer.model_name,
        "model_version": explainer.model_version,
        "accuracy": float(np.mean(every)),
        "per_kind": {k: float(np.mean(v)) for k, v in correct.items()},
        "content_llr_median": float(np.median(content)),
        "filler_llr_median": float(np.median(filler)),
        "content_tokens": len(content), "filler_tokens": len(filler),
        "example_failures": failures,
    }


def format_report(report: dict) -> str:
    return json.dumps(report, indent=2)
