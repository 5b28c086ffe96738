"""
MCMAE (ConvMAE): masked convolution stages before the transformer.

Gao et al., "ConvMAE: Masked Convolution Meets Masked Autoencoders", 2022. https://arxiv.org/abs/2205.03892
Only what the paper adds to MAE (mae.py): a hybrid encoder. Two convolution stages at 1/4 and 1/8 of the resolution
run densely, but multiply the mask in before every depthwise convolution (their only spatial operation), so hidden
regions cannot leak into visible ones; the transformer stage at 1/16 sees the visible tokens only; strided
convolutions bring stage-1/2 features to the visible stage-3 tokens before the final norm (multi-scale fusion). The
mask is drawn on the 1/16 grid and repeated onto the finer ones (block-wise masking), so a hidden token hides its
whole patch in every stage. Decoder and loss are MAE's; like ConvMAE v1 there is no cls token.

Sizes follow --model: stage widths (D/3, D/2, D), 2 and 2 conv blocks, then depth - 1 transformer blocks; for
vit_base that is ConvMAE-B's 256/384/768 with 2/2/11. --patch_size is the overall stride (16 in the paper; the
stem's stride is a quarter of it).
MR-MCMAE (this encoder + MR-MAE's mimic heads on the visible stage-3 tokens) is in mrmae.py, with the paper
that adds it.
"""

import torch.nn as nn
from timm.layers import DropPath, LayerNorm2d

from mae import MAE, ViT, drop_path_rates, gather_tokens

# The official convolution stages use LayerNorm's default eps, where the transformer blocks use 1e-6.
CONV_NORM_EPS = 1e-5


class ConvEmbed(nn.Module):
    """Strided, non-overlapping convolution + LayerNorm + GELU: the entry of each stage."""

    def __init__(self, in_dim, out_dim, stride):
        super().__init__()
        self.proj = nn.Conv2d(in_dim, out_dim, kernel_size=stride, stride=stride)
        self.norm = LayerNorm2d(out_dim, eps=CONV_NORM_EPS)
        self.act = nn.GELU()

    def forward(self, x):
        return self.act(self.norm(self.proj(x)))


class ConvMlp(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden_dim, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class MaskedConvBlock(nn.Module):
    """ConvMAE's block. The mask multiplies the input of the 5x5 depthwise convolution, the block's only spatial
    operation, so a visible position never sees a hidden one; everything else acts per position."""

    def __init__(self, dim, drop_path=0.0):
        super().__init__()
        self.norm1 = LayerNorm2d(dim, eps=CONV_NORM_EPS)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.attn = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.conv2 = nn.Conv2d(dim, dim, 1)
        self.norm2 = LayerNorm2d(dim, eps=CONV_NORM_EPS)
        self.mlp = ConvMlp(dim, 4 * dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x, visible):  # x (B, C, H, W); visible (B, 1, H, W), 1 = visible
        x = x + self.drop_path(self.conv2(self.attn(visible * self.conv1(self.norm1(x)))))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ConvStages(nn.Module):
    """Stages 1-2 and the stage-3 embedding. (B, 3, H, W) and the visible mask on the stage-3 grid (B, 1, h, w) ->
    stage-3 tokens (B, L, D3), and the stage-1 and stage-2 maps (for the multi-scale fusion of pre-training)."""

    def __init__(self, patch_size, dims, rates=(0.0,) * 4, depths=(2, 2)):  # rates: drop path of each conv block
        super().__init__()
        self.stem1 = ConvEmbed(3, dims[0], patch_size // 4)
        self.stage1 = nn.ModuleList(MaskedConvBlock(dims[0], r) for r in rates[:depths[0]])
        self.stem2 = ConvEmbed(dims[0], dims[1], 2)
        self.stage2 = nn.ModuleList(MaskedConvBlock(dims[1], r) for r in rates[depths[0]:])
        self.proj = nn.Conv2d(dims[1], dims[2], kernel_size=2, stride=2)  # the stage-3 patch embedding
        self.norm = LayerNorm2d(dims[2], eps=CONV_NORM_EPS)
        self.act = nn.GELU()
        self.linear = nn.Linear(dims[2], dims[2])

    def forward(self, imgs, visible):
        x, visible2 = self.stem1(imgs), visible.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        visible1 = visible2.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        for block in self.stage1:
            x = block(x, visible1)
        stage1 = x
        x = self.stem2(x)
        for block in self.stage2:
            x = block(x, visible2)
        stage2 = x
        x = self.act(self.norm(self.proj(x)))
        return self.linear(x.flatten(2).transpose(1, 2)), stage1, stage2


class ConvViT(ViT):
    """The hybrid encoder alone, as fine-tuning uses it: conv stages, then depth - 1 transformer blocks on all
    tokens; no cls token (ConvMAE v1). Arguments as ViT's, so that the sizes follow the --model names."""

    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                 drop_path=0.0, class_token=False):
        if patch_size % 4:
            raise ValueError(f'--patch_size {patch_size}: the hybrid encoder\'s overall stride must be divisible by 4')
        super().__init__(img_size, patch_size, embed_dim, depth - 1, num_heads, mlp_ratio, class_token=False)
        # Stochastic depth grows linearly over all 2 + 2 + (depth - 1) blocks, conv and transformer alike (the
        # official fine-tuning rule).
        rates = drop_path_rates(drop_path, 4 + depth - 1)
        self.patch_embed = ConvStages(patch_size, (embed_dim // 3, embed_dim // 2, embed_dim), rates[:4])
        for block, rate in zip(self.blocks, rates[4:]):
            block.drop_path = DropPath(rate) if rate > 0 else nn.Identity()

    def embed(self, imgs):  # every position visible
        visible = imgs.new_ones(imgs.shape[0], 1, *self.grid_size)
        return self.patch_embed(imgs, visible)[0] + self.pos_embed


class MCMAE(MAE, ConvViT):  # MAE's decoder and loss on the hybrid encoder
    encoder_class = ConvViT

    def __init__(self, embed_dim=768, **kwargs):
        super().__init__(embed_dim=embed_dim, **kwargs)
        dims = (embed_dim // 3, embed_dim // 2, embed_dim)
        self.fuse1 = nn.Conv2d(dims[0], dims[2], kernel_size=4, stride=4)  # multi-scale fusion: stage 1 -> 1/16
        self.fuse2 = nn.Conv2d(dims[1], dims[2], kernel_size=2, stride=2)  # stage 2 -> 1/16
        self.initialize_weights()  # again, for the fusion convolutions

    def forward_encoder(self, imgs, mask_ratio, noise=None):
        """Block-wise masking on the stage-3 grid; dense masked-conv stages; transformer on the visible tokens;
        fused stage-1/2 features added before the final norm: (B, K, D), mask (B, L), ids_restore (B, L)."""
        ids_keep, mask, ids_restore = self.sample_mask(imgs.shape[0], mask_ratio, noise, imgs.device)
        visible = (1 - mask).view(-1, 1, *self.grid_size)
        tokens, stage1, stage2 = self.patch_embed(imgs, visible)
        x = gather_tokens(tokens + self.pos_embed, ids_keep)
        for block in self.blocks:
            x = block(x)
        fused = (self.fuse1(stage1) + self.fuse2(stage2)).flatten(2).transpose(1, 2)
        return self.norm(x + gather_tokens(fused, ids_keep)), mask, ids_restore

