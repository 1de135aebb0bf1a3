"""The LoRA math on real UNet layers: W' = W + (alpha/r)·B·A, B = 0 at step 0, merge is free."""

from __future__ import annotations

import torch
from conftest import unet_output

from sdlora.config import LoraSpec
from sdlora.models.loading import load_pipeline
from sdlora.training.lora import add_lora, lora_state_dict, parameter_counts


def test_step0_output_equals_base(tiny_model):
    unet = load_pipeline(str(tiny_model)).unet
    before = unet_output(unet)
    add_lora(unet, LoraSpec(rank=4, alpha=8))
    assert torch.equal(unet_output(unet), before)
    assert all(v.abs().max() == 0 for k, v in lora_state_dict(unet).items() if "lora_B" in k)


def test_only_attention_projections_are_adapted_and_counted(tiny_model):
    unet = load_pipeline(str(tiny_model)).unet
    total_before = sum(p.numel() for p in unet.parameters())
    add_lora(unet, LoraSpec(rank=4, alpha=8))
    keys = lora_state_dict(unet).keys()
    adapted = {
        k.split(".lora_")[0].rsplit(".", 1)[-1]
        if not k.split(".lora_")[0].endswith("to_out.0")
        else "to_out.0"
        for k in keys
    }
    assert adapted == {"to_q", "to_k", "to_v", "to_out.0"}
    trainable, total = parameter_counts(unet)
    assert trainable == sum(v.numel() for v in lora_state_dict(unet).values())
    assert total == total_before + trainable


def test_extra_target_modules_are_adapted(tiny_model):
    unet = load_pipeline(str(tiny_model)).unet
    add_lora(unet, LoraSpec(rank=2, alpha=2, extra_target_modules=("proj_in", "conv1")))
    state = lora_state_dict(unet)
    assert any(".proj_in.lora_A" in k for k in state)
    conv_a = state["down_blocks.0.resnets.0.conv1.lora_A.weight"]
    assert conv_a.shape[0] == 2 and conv_a.shape[2:] == (3, 3)  # a 3x3 conv's A keeps the kernel
    assert not any(k.startswith("conv_in.") for k in state)  # "conv1" does not match conv_in


def test_update_is_alpha_over_rank_times_b_a(tiny_model):
    unet = load_pipeline(str(tiny_model)).unet
    base_weight = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.detach().clone()
    add_lora(unet, LoraSpec(rank=4, alpha=10))
    layer = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q  # now peft's LoRA layer
    torch.manual_seed(1)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(3, base_weight.shape[1])
    expected = x @ (base_weight + (10 / 4) * b @ a).T
    with torch.no_grad():
        assert torch.allclose(layer(x), expected, atol=1e-5)


def test_merge_into_weights_equals_unmerged_output(tiny_model):
    unet = load_pipeline(str(tiny_model)).unet
    add_lora(unet, LoraSpec(rank=4, alpha=8, extra_target_modules=("conv1", "conv2", "ff.net.2")))
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    unmerged = unet_output(unet)
    layers = [m for m in unet.modules() if hasattr(m, "merge") and hasattr(m, "lora_A")]
    for m in layers:
        m.merge()
    merged = unet_output(unet)
    assert torch.allclose(merged, unmerged, atol=1e-5)
    for m in layers:
        m.unmerge()
    assert torch.allclose(unet_output(unet), unmerged, atol=1e-5)


def test_swapping_a_b_switches_tasks_over_one_base(tiny_model):
    unet = load_pipeline(str(tiny_model)).unet
    base = unet_output(unet)
    add_lora(unet, LoraSpec(rank=4, alpha=8))
    torch.manual_seed(2)
    task_a = {k: torch.randn_like(v) * 0.05 for k, v in lora_state_dict(unet).items()}
    task_b = {k: torch.randn_like(v) * 0.05 for k, v in lora_state_dict(unet).items()}
    from sdlora.training.lora import load_lora_state_dict

    load_lora_state_dict(unet, task_a)
    out_a = unet_output(unet)
    load_lora_state_dict(unet, task_b)
    out_b = unet_output(unet)
    load_lora_state_dict(unet, task_a)
    assert torch.equal(unet_output(unet), out_a)
    assert not torch.allclose(out_a, out_b) and not torch.allclose(out_a, base)
