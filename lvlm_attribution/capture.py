"""The only module that touches attention internals.

Attention probabilities are captured through transformers' `AttentionInterface`: for the duration
of a `capture(...)` block the decoder's attention implementation is switched to our function,
which materializes the softmax (so gradients can reach it) only for the requested layers and query
rows and runs SDPA for everything else. A mask function is registered under the same name, or
the function would receive `attention_mask=None` and attend bidirectionally (DESIGN §4). On exit
the previous implementation is restored and every registration and hook is removed, also when the
block raises.

Two more taps serve logit-lens methods: the output of every decoder layer, and an option to make
every decoder layer's input a fresh leaf so that the residual stream carries no gradient between
layers (DEX-AR's one-pass form: d o^l / d A^l then reaches layer l's own attention only).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.models.llama.modeling_llama import repeat_kv

from .models.base import ModelAdapter

IMPLEMENTATION = "lvlm_attribution_capture"


@dataclass
class CaptureSpec:
    """What to capture. `layers=None` means every decoder layer; `rows=None` every query row."""

    layers: Sequence[int] | None = None
    rows: torch.Tensor | None = None
    layer_outputs: bool = False
    detach_layer_inputs: bool = False


@dataclass
class Captured:
    """Filled during the forward. probs[l]: (B, H, |rows|, N), part of the autograd graph."""

    spec: CaptureSpec
    probs: dict[int, torch.Tensor] = field(default_factory=dict)
    layer_outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    layer_inputs: dict[int, torch.Tensor] = field(default_factory=dict)

    def stacked_probs(self) -> torch.Tensor:
        """(L_captured, B, H, R, N) in layer order."""
        return torch.stack([self.probs[k] for k in sorted(self.probs)])


_ACTIVE: list[Captured] = []  # a stack, so a capture inside a capture is an error we can detect


def _capturing_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                         value: torch.Tensor, attention_mask: torch.Tensor | None,
                         scaling: float | None = None, dropout: float = 0.0, **kwargs):
    active = _ACTIVE[-1] if _ACTIVE else None
    layer = getattr(module, "layer_idx", None)
    wanted = active is not None and layer is not None and (
        active.spec.layers is None or layer in active.spec.layers)
    if not wanted:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      scaling=scaling, dropout=dropout, **kwargs)
    if attention_mask is None:
        raise RuntimeError("capture received no attention mask; an eager softmax would attend "
                           "bidirectionally (register the mask function)")
    rows = active.spec.rows
    out, probs = _explicit_attention(module, query, key, value, attention_mask, scaling, rows)
    active.probs[layer] = probs
    if rows is None:
        return out, probs
    # Rows we do not need come from SDPA; the explicit rows replace theirs exactly.
    fast, _ = sdpa_attention_forward(module, query, key, value, attention_mask,
                                     scaling=scaling, dropout=dropout, **kwargs)
    return fast.index_copy(1, rows.to(fast.device), out), probs


def _explicit_attention(module, query, key, value, mask, scaling, rows):
    """softmax(q k^T * scale + mask) v for the selected query rows. Returns output as
    (B, rows, H, D), as attention functions must, and the probabilities (B, H, rows, N)."""
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if rows is not None:
        query = query.index_select(2, rows.to(query.device))
        mask = mask.index_select(2, rows.to(mask.device)) if mask.shape[2] > 1 else mask
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    scores = scores + mask[:, :, :, : key.shape[-2]]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if torch.is_grad_enabled() and not probs.requires_grad:
        probs.requires_grad_(True)  # nothing upstream needs gradients: make A itself the leaf
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


@contextlib.contextmanager
def _registered() -> Iterator[None]:
    AttentionInterface.register(IMPLEMENTATION, _capturing_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, eager_mask)
    try:
        yield
    finally:
        AttentionInterface._global_mapping.pop(IMPLEMENTATION, None)
        AttentionMaskInterface._global_mapping.pop(IMPLEMENTATION, None)


def _implementations(model: nn.Module) -> dict[str, str]:
    config = model.config
    out = {"": config._attn_implementation}
    for key in config.sub_configs:
        sub = getattr(config, key, None)
        if sub is not None:
            out[key] = sub._attn_implementation
    return out


@contextlib.contextmanager
def _decoder_attention(model: nn.Module, adapter: ModelAdapter) -> Iterator[None]:
    before = _implementations(model)
    wanted = dict(before)
    wanted[adapter.text_config_key] = IMPLEMENTATION
    model.set_attn_implementation(wanted)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


@contextlib.contextmanager
def _layer_hooks(adapter: ModelAdapter, captured: Captured) -> Iterator[None]:
    handles = []
    spec = captured.spec
    try:
        for index, layer in enumerate(adapter.decoder_layers()):
            if spec.detach_layer_inputs:
                handles.append(layer.register_forward_pre_hook(
                    _detaching_pre_hook(index, captured), with_kwargs=True))
            if spec.layer_outputs:
                handles.append(layer.register_forward_hook(_output_hook(index, captured)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _detaching_pre_hook(index: int, captured: Captured):
    def hook(module, args, kwargs):
        if args:
            leaf = args[0].detach().requires_grad_(True)
            captured.layer_inputs[index] = leaf
            return (leaf, *args[1:]), kwargs
        leaf = kwargs["hidden_states"].detach().requires_grad_(True)
        captured.layer_inputs[index] = leaf
        return args, {**kwargs, "hidden_states": leaf}
    return hook


def _output_hook(index: int, captured: Captured):
    def hook(module, args, output):
        captured.layer_outputs[index] = output[0] if isinstance(output, tuple) else output
    return hook


@contextlib.contextmanager
def capture(model: nn.Module, adapter: ModelAdapter, spec: CaptureSpec) -> Iterator[Captured]:
    """Run forwards inside this block to fill the returned `Captured`."""
    if _ACTIVE:
        raise RuntimeError("nested capture blocks are not supported")
    captured = Captured(spec)
    with _registered(), _decoder_attention(model, adapter), _layer_hooks(adapter, captured):
        _ACTIVE.append(captured)
        try:
            yield captured
        finally:
            _ACTIVE.pop()


def leftover_state(model: nn.Module) -> list[str]:
    """Anything a capture left behind (used by tests): registrations, our hooks, the capture
    implementation. transformers installs hooks of its own; only ours are reported."""
    problems = []
    if IMPLEMENTATION in AttentionInterface._global_mapping:
        problems.append("attention function still registered")
    if IMPLEMENTATION in AttentionMaskInterface._global_mapping:
        problems.append("mask function still registered")
    if IMPLEMENTATION in _implementations(model).values():
        problems.append("model still uses the capture implementation")
    for name, module in model.named_modules():
        hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
        if any(getattr(h, "__module__", None) == __name__ for h in hooks):
            problems.append(f"hook left on {name}")
    if _ACTIVE:
        problems.append("capture stack not empty")
    return problems
