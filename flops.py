"""
FLOPs and MFU: training FLOPs counted by torch.utils.flop_counter (matmuls, convolutions, attention), with formulas
for the attention kernels it does not know; the bf16 matmul peak measured on the card in use; and model FLOPs
utilisation against it.
"""

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count


def fused_attention_flops(query, key, value, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias, *args,
                          out_shape=None, **kwargs):
    """nn.MultiheadAttention's fused inference kernel (open_clip's CLIP takes it in eval mode without autograd): the
    q, k, v and output projections, and the two attention matmuls."""
    (batch, queries, width), keys = query, key[1]
    projections = 2 * batch * width * width * (2 * queries + 2 * keys)
    return projections + 4 * batch * queries * keys * width


def cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query, key, value)


def cpu_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad_out, query, key, value)


# Kernels torch.utils.flop_counter has no formula for, which would otherwise count as zero FLOPs.
FLOP_FORMULAS = {torch.ops.aten._native_multi_head_attention: fused_attention_flops,
                 torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention_flops,
                 torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_attention_backward_flops}


def count_flops(fn):
    """The FLOPs of fn() as torch.utils.flop_counter counts them (matmuls, convolutions, attention), on every
    device and through every attention kernel."""
    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
        fn()
    return counter.get_total_flops()


def measured_peak_flops(device, n=8192, reps=20):
    """What this card's bf16 matmul really reaches: the honest denominator for MFU."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (start.elapsed_time(end) / 1e3)


def per_image(train_step, img_size, device):
    """Training FLOPs of one image: train_step(imgs) (forward and backward, the teacher's forward included) counted
    on a batch of two. The count draws from a forked RNG (the masks): training draws the same whether it counts."""
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
        imgs = torch.randn(2, 3, img_size, img_size, device=device)
        return count_flops(lambda: train_step(imgs)) / imgs.shape[0]


def mfu(img_per_s, flops_per_image, peak_flops, world_size=1):
    """Model FLOPs utilisation of one device: the FLOPs it does per second over the peak it can do."""
    return img_per_s / world_size * flops_per_image / peak_flops

