"""LoRA adapters (through peft) and the named tensors they travel as.

A LoRA layer computes x ↦ W₀x + (α/r)·B·A·x with W₀ frozen, A ∈ R^{r×d_in} random (Kaiming
uniform) and B ∈ R^{d_out×r} zero at the start, so a fresh adapter leaves the model unchanged
(Hu et al., 2021). FELLRec's defaults: r = 8, α = 16, dropout 0.05 on q_proj and v_proj.

An adapter leaves a client as ``dict[str, Tensor]``: only the trainable tensors, on the CPU, with
stable names that carry neither the client nor peft's adapter name
(``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``). ``get_adapter`` and
``set_adapter`` are the only two functions that move adapter state in or out of a model, so one
base model can serve every client by swapping tensors.

FLoRA and FedEx-LoRA also change the frozen weights: the server folds a residual into them every
round. ``add_residuals`` gives each LoRA layer a residual ΔW (zero at first) that travels with the
adapter as ``<layer>.delta_w`` and is never trained; loading one sets the layer's frozen weight to
W₀ + ΔW, so it costs nothing at run time.
"""

from __future__ import annotations

import warnings

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import Tensor, nn

from fellrec.config import LoraConfig as LoraSettings
from fellrec.errors import ConfigError

_ADAPTER = "default"  # peft's name for the one adapter we attach
DELTA_W = ".delta_w"  # a LoRA layer's residual folded into its frozen weight (FLoRA, FedEx-LoRA)


def is_residual(name: str) -> bool:
    return name.endswith(DELTA_W)


def add_lora(model: nn.Module, settings: LoraSettings, seed: int = 0) -> PeftModel:
    """Wrap ``model`` with a LoRA adapter; only the adapter's tensors require gradients."""
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in settings.targets if t not in names]
    if missing:
        raise ConfigError(f"model.lora.targets: the model has no linear layer named {', '.join(missing)}; "
                          f"it has {', '.join(sorted(names))}")
    layers = None
    if settings.last_blocks is not None:
        n = model.config.num_hidden_layers
        if settings.last_blocks > n:
            raise ConfigError(f"model.lora.last_blocks: {settings.last_blocks} asked for, the model has {n} blocks")
        layers = list(range(n - settings.last_blocks, n))
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.targets), bias="none", layers_to_transform=layers)
    with torch.random.fork_rng(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renamed a gradient-checkpointing flag
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config, adapter_name=_ADAPTER)
    # peft's new dropout layers start in training mode; a model is in eval mode until something trains it
    return peft_model.eval()


def _strip(name: str) -> str:
    return name.replace(f".{_ADAPTER}.", ".")


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable parameters by portable name (the live tensors, not copies); for a split model,
    the client's part."""
    if getattr(model, "fellrec_split", False):
        return model.adapter_parameters()
    return {_strip(n): p for n, p in model.named_parameters() if p.requires_grad}


def add_residuals(model: nn.Module) -> list[str]:
    """Give every LoRA layer of ``model`` a residual ΔW = 0 on its frozen weight (see the module's
    doc); returns the residuals' names. The frozen weights W₀ are kept aside, once."""
    from peft.tuners.lora import LoraLayer

    found = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and not hasattr(module, "fellrec_w0"):
            weight = module.get_base_layer().weight
            module.fellrec_w0 = weight.detach().clone()
            module.fellrec_delta = torch.zeros_like(weight, device="cpu")
            found[_strip(name) + DELTA_W] = module
    if not found:
        raise ValueError("add_residuals: the model has no LoRA layer")
    model.fellrec_residuals = {**getattr(model, "fellrec_residuals", {}), **found}
    return list(found)


def _residuals(model: nn.Module) -> dict[str, nn.Module]:
    return getattr(model, "fellrec_residuals", {})


def get_adapter(model: nn.Module) -> dict[str, Tensor]:
    """A copy of the adapter's tensors, on the CPU (with the residuals, where the model has them)."""
    out = {n: p.detach().to("cpu", copy=True) for n, p in adapter_parameters(model).items()}
    out.update({n: m.fellrec_delta.clone() for n, m in _residuals(model).items()})
    return out


def set_adapter(model: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Load ``tensors`` (as ``get_adapter`` returns them) into the model's adapter, in place."""
    params, residuals = adapter_parameters(model), _residuals(model)
    own = {n: t for n, t in tensors.items() if n not in residuals}
    if set(own) != set(params):
        extra, lacking = sorted(set(own) - set(params)), sorted(set(params) - set(own))
        raise ValueError(f"adapter tensors do not match the model: unexpected {extra[:3]}, missing {lacking[:3]}")
    for name, p in params.items():
        if own[name].shape != p.shape:
            raise ValueError(f"adapter tensor {name}: shape {tuple(own[name].shape)}, model has {tuple(p.shape)}")
    if residuals:
        _set_residuals(residuals, tensors)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(own[name])


def _set_residuals(residuals: dict[str, nn.Module], tensors: dict[str, Tensor]) -> None:
    missing = sorted(set(residuals) - set(tensors))
    if missing:
        raise ValueError(f"adapter tensors do not match the model: missing {missing[:3]}")
    with torch.no_grad():
        for name, module in residuals.items():
            delta = tensors[name]
            if delta.shape != module.fellrec_w0.shape:
                raise ValueError(f"adapter tensor {name}: shape {tuple(delta.shape)}, model has "
                                 f"{tuple(module.fellrec_w0.shape)}")
            module.fellrec_delta = delta.detach().to("cpu", torch.float32, copy=True)
            module.get_base_layer().weight.copy_(module.fellrec_w0 + delta.to(module.fellrec_w0))
