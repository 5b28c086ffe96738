"""
A small Vision Transformer, and MAE on top of it. Every method in this repository builds on this file.

MAE: He et al., "Masked Autoencoders Are Scalable Vision Learners", 2021. https://arxiv.org/abs/2111.06377
Parameter names follow timm's VisionTransformer and the official MAE checkpoints, so an encoder trained here
loads into timm.create_model('vit_base_patch16_224', ...) and an official MAE checkpoint loads here.

Outside train.py this file alone is a complete MAE (README, "Copy a method"); train.py drives every method through
the small interface described at train.METHODS, which MAE's adapters (build_teacher, from_args) implement here.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath

VIT_SIZES = {
    'vit_tiny': dict(embed_dim=192, depth=12, num_heads=3),
    'vit_small': dict(embed_dim=384, depth=12, num_heads=6),
    'vit_base': dict(embed_dim=768, depth=12, num_heads=12),
    'vit_large': dict(embed_dim=1024, depth=24, num_heads=16),
    'vit_huge': dict(embed_dim=1280, depth=32, num_heads=16),  # the paper uses patch 14 for huge
}


def sincos_pos_embed(dim, grid_h, grid_w):
    """Fixed 2-D sin-cos position code with a zero row for the cls slot: (1, 1 + grid_h*grid_w, dim).
    The first half of the channels encodes the column, the second half the row (the official MAE layout)."""
    assert dim % 4 == 0, f'sin-cos position embedding needs a width divisible by 4, got {dim}'
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64),
                                torch.arange(grid_w, dtype=torch.float64), indexing='ij')

    def encode(pos):  # (N,) -> (N, dim/2)
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    emb = torch.cat([encode(cols), encode(rows)], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb]).float().unsqueeze(0)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, embed_dim, in_chans=3):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, imgs):
        return self.proj(imgs).flatten(2).transpose(1, 2)  # (B, L, D)


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        # Unbinding q, k, v along the token-major layout the linear writes, then transposing each to (B, heads, N,
        # C/heads), lets backward stack their gradients straight into that layout: one copy. Permuting heads first
        # (timm's order) costs a second full copy of the qkv gradient per block; the values are identical.
        q, k, v = (t.transpose(1, 2) for t in self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).unbind(2))
        x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, C/heads), flash/efficient kernels on GPU
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def drop_path_rates(max_rate, depth):
    """Stochastic depth grows linearly from 0 at the first block to max_rate at the last."""
    return [max_rate * i / max(1, depth - 1) for i in range(depth)]


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    """The encoder: patch embedding + fixed position code, a learned cls token, pre-norm blocks, final norm."""

    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                 drop_path=0.0, class_token=True):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f'image size {img_size} is not divisible by patch size {patch_size} (--img_size, '
                             f'--patch_size)')
        self.img_size, self.patch_size, self.num_heads = img_size, patch_size, num_heads
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.num_prefix_tokens = 1 if class_token else 0  # timm's name; MCMAE has no cls token
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        pos_embed = sincos_pos_embed(embed_dim, *self.grid_size)[:, 1 - self.num_prefix_tokens:]
        self.pos_embed = nn.Parameter(pos_embed, requires_grad=False)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, rate)
                                    for rate in drop_path_rates(drop_path, depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def initialize_weights(self):
        """MAE's init: xavier-uniform Linear layers (zero bias) and patch projection (as a Linear), N(0, 0.02)
        tokens, LayerNorm 1/0. Calling it again re-draws every learned weight (dBOT re-initialises students)."""
        self.patch_embed.proj.reset_parameters()  # default conv bias, as in the official code
        weight = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        for name, param in self.named_parameters():
            if name.endswith('token'):
                nn.init.normal_(param, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def prepend_cls(self, x):
        if self.cls_token is None:
            return x
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    def embed(self, imgs):
        """(B, 3, H, W) -> (B, 1 + L, D): patch embedding plus position code, cls first."""
        return self.prepend_cls(self.patch_embed(imgs) + self.pos_embed[:, self.num_prefix_tokens:])

    def forward_blocks(self, imgs):
        """All tokens of the unmasked image after the last block, before the final norm: (B, 1 + L, D)."""
        x = self.embed(imgs)
        for block in self.blocks:
            x = block(x)
        return x

    def forward_features(self, imgs):
        """(B, 1 + L, D) after the final norm, cls first: what timm's forward_features returns."""
        return self.norm(self.forward_blocks(imgs))

    def forward(self, imgs):
        """The encoder's features of the whole image: (B, 1 + L, D), as forward_features."""
        return self.forward_features(imgs)


ENCODER_KEYS = ('cls_token', 'pos_embed', 'patch_embed.', 'blocks.', 'norm.')


def encoder_state_dict(state_dict):
    """The encoder's part of a method's state dict: it loads into ViT here and into timm's VisionTransformer."""
    return {k: v for k, v in state_dict.items() if k.startswith(ENCODER_KEYS)}


class MAE(ViT):
    """Masked autoencoder (MAE §3): encode a random 25% of the patches, reconstruct the rest's pixels."""
    encoder_class = ViT  # what fine-tuning keeps: the encoder alone

    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, decoder_dim=512,
                 decoder_depth=8, decoder_heads=16, mlp_ratio=4.0, norm_pix_loss=True, drop_path=0.0, pred_dim=None,
                 class_token=True):
        super().__init__(img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio, drop_path, class_token)
        self.norm_pix_loss = norm_pix_loss
        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        pos_embed = sincos_pos_embed(decoder_dim, *self.grid_size)[:, 1 - self.num_prefix_tokens:]
        self.decoder_pos_embed = nn.Parameter(pos_embed, requires_grad=False)
        self.decoder_blocks = nn.ModuleList(Block(decoder_dim, decoder_heads, mlp_ratio, rate)
                                            for rate in drop_path_rates(drop_path, decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        # Per-token output: the p*p*3 pixels of a patch for MAE; subclasses predict features instead (dBOT).
        self.decoder_pred = nn.Linear(decoder_dim, pred_dim or patch_size ** 2 * 3)
        self.loss_terms = {}
        self.initialize_weights()

    default_stages = 1
    flags = ()  # the method-specific train.py flags it uses (train.METHOD_FLAGS); others are refused

    @classmethod
    def build_teacher(cls, args, state=None):
        return None  # MAE's target is the image itself

    @classmethod
    def from_args(cls, args, teacher=None, **method_kwargs):
        return cls(img_size=args.img_size, patch_size=args.patch_size, **VIT_SIZES[args.model],
                   decoder_dim=args.decoder_dim, decoder_depth=args.decoder_depth, decoder_heads=args.decoder_heads,
                   norm_pix_loss=args.norm_pix_loss, drop_path=args.drop_path, **method_kwargs)

    def teacher_state(self, teacher):
        return None

    def patchify(self, imgs):
        """(B, 3, H, W) -> (B, L, p*p*3), channel last inside a patch."""
        p, (h, w) = self.patch_size, self.grid_size
        x = imgs.reshape(imgs.shape[0], 3, h, p, w, p)
        return torch.einsum('nchpwq->nhwpqc', x).reshape(imgs.shape[0], h * w, p * p * 3)

    def unpatchify(self, x):
        """(B, L, p*p*3) -> (B, 3, H, W)."""
        p, (h, w) = self.patch_size, self.grid_size
        x = x.reshape(x.shape[0], h, w, p, p, 3)
        return torch.einsum('nhwpqc->nchpwq', x).reshape(x.shape[0], 3, h * p, w * p)

    def sample_mask(self, batch_size, mask_ratio, noise=None, device=None):
        """Keep a random K = int(L * (1 - mask_ratio)) tokens per sample: those with the smallest noise (B, L).
        -> ids_keep (B, K), mask (B, L) with 1 = hidden, ids_restore (B, L) that undoes the shuffle."""
        L = self.num_patches
        len_keep = int(L * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(batch_size, L, device=device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        mask = torch.ones(batch_size, L, device=noise.device)
        mask[:, :len_keep] = 0
        return ids_shuffle[:, :len_keep], torch.gather(mask, 1, ids_restore), ids_restore

    def random_masking(self, x, mask_ratio, noise=None):
        """x: (B, L, D) -> x_visible (B, K, D), mask (B, L) with 1 = hidden, ids_restore (B, L)."""
        ids_keep, mask, ids_restore = self.sample_mask(x.shape[0], mask_ratio, noise, x.device)
        return gather_tokens(x, ids_keep), mask, ids_restore

    def embed_visible(self, imgs, mask_ratio, noise=None):
        """Patch embedding plus position code, then only the visible tokens, cls first: (B, 1 + K, D)."""
        x = self.patch_embed(imgs) + self.pos_embed[:, self.num_prefix_tokens:]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        return self.prepend_cls(x), mask, ids_restore

    def forward_encoder(self, imgs, mask_ratio, noise=None):
        """Visible tokens only (MAE §3, "MAE encoder"): (B, 1 + K, D) after the final norm."""
        x, mask, ids_restore = self.embed_visible(imgs, mask_ratio, noise)
        for block in self.blocks:
            x = block(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        """Visible tokens plus one shared mask token per hidden patch, back in image order (MAE §3, "MAE
        decoder"): (B, 1 + K, D) -> (B, 1 + L, pred_dim), the cls slot included (dBOT predicts it too)."""
        x = self.decoder_embed(x)
        (B, L), n = ids_restore.shape, self.num_prefix_tokens
        mask_tokens = self.mask_token.expand(B, L + n - x.shape[1], -1)
        patches = gather_tokens(torch.cat([x[:, n:], mask_tokens], dim=1), ids_restore)
        x = torch.cat([x[:, :n], patches], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))

    def pixel_targets(self, imgs):
        """Patch pixels, each patch standardised by its own mean and variance with norm_pix_loss (MAE §4)."""
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def forward_loss(self, imgs, pred, mask):
        """Mean squared error per patch, averaged over the hidden patches only (MAE §3, "Reconstruction
        target")."""
        loss = ((pred - self.pixel_targets(imgs)) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs, mask_ratio=0.75, noise=None, targets=None):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)[:, self.num_prefix_tokens:]  # cls has no pixels
        return self.forward_loss(imgs, pred, mask), pred, mask

    @torch.no_grad()
    def visualize(self, imgs, pred, mask, targets=None):
        target = self.patchify(imgs)
        if self.norm_pix_loss:  # predictions are in per-patch standard units: undo with the original's stats
            pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
        visible = target * (1 - mask.unsqueeze(-1))
        rows = [imgs, self.unpatchify(visible), self.unpatchify(pred),
                self.unpatchify(visible + pred * mask.unsqueeze(-1))]
        caption = 'original | masked | reconstruction | reconstruction + visible patches'
        if self.norm_pix_loss:
            caption += " (each predicted patch shown with the mean/std of the original patch)"
        return [denormalize(row) for row in rows], caption


def gather_tokens(x, ids):
    """x (B, L, D), ids (B, K) -> x[b, ids[b]] (B, K, D)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def whiten(tokens, unbiased):
    """Per-token standardisation of feature targets over their channels, in fp32: (x - mean) / sqrt(var + 1e-6). The
    variance is the unbiased one (divided by D - 1) where the official code says so (dBOT), the biased one (a
    LayerNorm without affine parameters) elsewhere; each call site names its choice."""
    tokens = tokens.float()
    mean, var = tokens.mean(dim=-1, keepdim=True), tokens.var(dim=-1, keepdim=True, unbiased=unbiased)
    return (tokens - mean) / (var + 1e-6) ** 0.5


def denormalize(imgs):
    """ImageNet-normalised images -> [0, 1] for display."""
    mean = imgs.new_tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = imgs.new_tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    return (imgs.float() * std + mean).clamp(0, 1)
