"""Registration with transformers, model compatibility checks, where each layer computes."""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..attention import squeezed_attention_forward

NAME = "squeezed"


def register() -> None:
    """Make `attn_implementation="squeezed"` known to transformers (idempotent)."""
    AttentionInterface.register(NAME, squeezed_attention_forward)
    # Without a mask entry a custom attention receives attention_mask=None even with padding.
    AttentionMaskInterface.register(NAME, sdpa_mask)


def attention_modules(model) -> list[torch.nn.Module]:
    """The self-attention modules of `model`, in layer order."""
    found = {}
    for module in model.modules():
        if hasattr(module, "layer_idx") and hasattr(module, "num_key_value_groups"):
            found.setdefault(module.layer_idx, module)
    return [found[i] for i in sorted(found)]


def layer_devices(model) -> list[torch.device]:
    """The device each attention layer computes on (its weights' device).

    A model dispatched over several GPUs (`device_map="auto"`) runs each layer where its weights are,
    so that is where the layer's part of a SqueezedCache must live. Weights offloaded to CPU or disk
    (accelerate keeps them on the "meta" device and copies them in per call) are refused.
    """
    devices = []
    for module in attention_modules(model):
        weight = next(module.parameters(), None)
        device = weight.device if weight is not None else model.device
        if device.type == "meta":
            raise NotImplementedError(
                f"attention layer {module.layer_idx} has its weights offloaded (on the meta device); a SqueezedCache "
                "needs every layer resident on a device: load the model with a device_map without 'disk' (and "
                "without CPU offload), e.g. device_map='auto' with enough GPU memory, or max_memory set to fit"
            )
        devices.append(device)
    return devices


def check_model(model) -> None:
    """Raise a clear error if `model` cannot use a SqueezedCache."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "generate"):
        raise TypeError(f"expected a transformers causal LM (e.g. from AutoModelForCausalLM), got {type(model).__name__}")
    name = f"{type(model).__name__} ({config.model_type})"
    if getattr(config, "is_encoder_decoder", False):
        raise NotImplementedError(f"{name} is an encoder-decoder model; hf_squeeze supports decoder-only LMs")
    impl = getattr(config, "_attn_implementation", None)
    if impl != NAME:
        raise ValueError(
            f"{name} uses attn_implementation={impl!r}; a SqueezedCache needs the squeezed attention. Load it with "
            "from_pretrained(..., attn_implementation='squeezed') after `import hf_squeeze`, or call "
            "model.set_attn_implementation('squeezed')."
        )
    layer_types = getattr(config, "layer_types", None) or []
    other = sorted({t for t in layer_types if t != "full_attention"})
    if other:
        raise NotImplementedError(
            f"{name} has {other} layers; hf_squeeze supports models whose layers all use full attention "
            "(sliding-window, chunked and linear-attention layers are not supported)"
        )
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        raise NotImplementedError(f"{name} uses sliding-window attention (sliding_window={config.sliding_window})")
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise NotImplementedError(f"{name} soft-caps attention logits, which squeezed attention does not model")
    modules = attention_modules(model)
    expected = getattr(config, "num_hidden_layers", len(modules))
    if not modules or len(modules) != expected:
        raise NotImplementedError(
            f"{name}: found {len(modules)} attention modules for {expected} layers; hf_squeeze needs standard "
            "transformers attention modules (with layer_idx and num_key_value_groups)"
        )


def kv_heads_held(model, local_heads: int) -> tuple[int, int]:
    """(first KV head this process computes, KV heads of the model): (0, H) on one process; under
    transformers' tensor parallelism (tp_plan) each rank holds a contiguous slice of the heads."""
    total = model.config.num_key_value_heads
    if local_heads == total:
        return 0, total
    if total % local_heads or not torch.distributed.is_initialized():
        raise ValueError(
            f"the model computes {local_heads} of its {total} KV heads outside a tensor-parallel group this "
            "library knows (transformers' tp_plan over torch.distributed): load it whole, or with tp_plan='auto'"
        )
    return torch.distributed.get_rank() % (total // local_heads) * local_heads, total
