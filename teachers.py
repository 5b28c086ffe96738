"""
Frozen teachers, loaded in one place for every method: CLIP through open_clip, DINO through timm, and encoders trained
here (train.py checkpoints of any method: ViTs, and MCMAE's hybrid encoder; dBOT teacher-stageK.pth files). Each is wrapped so that it sees the
full image re-normalised to its own mean/std at the size that puts its token grid on the student's, and each file is
recorded with its SHA-256, so that a resumed run can insist on the same teachers. Used by mrmae.py (and mcmae.py's
MR-MCMAE) and by dbot.py's CLIP teacher; knows no method.
"""

import hashlib
from pathlib import Path

import open_clip
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from mae import build_vit, read_encoder_state_dict
from mcmae import build_conv_vit


class FrozenViT(nn.Module):
    """One frozen teacher behind a common interface. It sees the full image re-normalised to its own mean/std and
    resized so that its token grid is exactly the student's (a patch-16 teacher of a 64 px, patch-8 student sees the
    image at 128 px): each teacher token then covers the same pixels as the student token it teaches, which
    resampling a token map computed at the teacher's native size would only approximate."""

    def __init__(self, backbone, mean, std, patch_size, grid_size, width, num_prefix_tokens=1):
        super().__init__()
        self.backbone = backbone.requires_grad_(False).eval()
        self.num_prefix_tokens = num_prefix_tokens  # cls (and register) tokens before the patch tokens
        self.input_size = (grid_size[0] * patch_size, grid_size[1] * patch_size)
        self.width = width
        mean, std = torch.tensor(mean), torch.tensor(std)
        scale = torch.tensor(IMAGENET_DEFAULT_STD) / std  # ImageNet-normalised -> teacher-normalised
        shift = (torch.tensor(IMAGENET_DEFAULT_MEAN) - mean) / std
        self.register_buffer('scale', scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer('shift', shift.view(1, 3, 1, 1), persistent=False)

    def last_two_blocks(self, x):  # -> outputs of the last two blocks, (B, prefix + L, D) each, prefix tokens first
        raise NotImplementedError

    def last_block(self):  # -> norm, fused qkv weight and bias, heads: timm's layout, which ours shares
        block = self.backbone.blocks[-1]
        return block.norm1, block.attn.qkv.weight, block.attn.qkv.bias, block.attn.num_heads

    def prepare(self, imgs):
        """ImageNet-normalised images -> this teacher's normalisation, at the size that puts its grid on the
        student's."""
        x = imgs * self.scale + self.shift
        if x.shape[-2:] != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode='bicubic', align_corners=False, antialias=True)
        return x

    def forward(self, imgs, attention=False):
        """-> the last block's patch tokens (B, L, D_t), before any final norm or projection, and with attention=True
        the last layer's [CLS] -> patch attention averaged over heads (B, L), else None."""
        before_last, last = self.last_two_blocks(self.prepare(imgs))
        n = self.num_prefix_tokens
        if not attention:
            return last[:, n:], None
        norm, qkv_weight, qkv_bias, heads = self.last_block()
        q, k, _ = F.linear(norm(before_last), qkv_weight, qkv_bias).chunk(3, dim=-1)
        B, N, D = k.shape
        q = q[:, :1].reshape(B, 1, heads, D // heads).transpose(1, 2)  # (B, heads, 1, D/heads)
        k = k.reshape(B, N, heads, D // heads).transpose(1, 2)  # (B, heads, N, D/heads)
        weights = (q @ k.transpose(-2, -1) * (D // heads) ** -0.5).softmax(dim=-1)  # (B, heads, 1, N)
        return last[:, n:], weights.mean(dim=1)[:, 0, n:]


class ClipTeacher(FrozenViT):  # open_clip's VisionTransformer
    def last_two_blocks(self, x):
        out = self.backbone.forward_intermediates(x, indices=2, intermediates_only=True, output_fmt='NLC',
                                                  output_extra_tokens=True)
        return [torch.cat(pair, dim=1) for pair in zip(out['image_intermediates_prefix'], out['image_intermediates'])]

    def last_block(self):
        block = self.backbone.transformer.resblocks[-1]
        return block.ln_1, block.attn.in_proj_weight, block.attn.in_proj_bias, block.attn.num_heads


class TimmTeacher(FrozenViT):  # timm's VisionTransformer (DINO)
    def last_two_blocks(self, x):
        out = self.backbone.forward_intermediates(x, indices=2, return_prefix_tokens=True, norm=False,
                                                  output_fmt='NLC', intermediates_only=True)
        return [torch.cat([prefix, tokens], dim=1) for tokens, prefix in out]


class OwnTeacher(FrozenViT):  # an encoder trained here: a ViT (mae.py) or MCMAE's hybrid (mcmae.py), no cls token
    def last_two_blocks(self, x):
        x = self.backbone.embed(x)
        for block in self.backbone.blocks[:-1]:
            x = block(x)
        return x, self.backbone.blocks[-1](x)


def sha256(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def weights_source(flag, value, hub_names):
    """A local weights file (the normal case here) or, where a network exists, a pretrained tag of the library."""
    if value in hub_names:
        return value, None
    tags = f' or one of {", ".join(hub_names)} where a network exists' if hub_names else ''
    if value is None:
        teacher = flag.removeprefix('--').removesuffix('_weights')
        raise ValueError(f'--teacher {teacher} needs {flag} FILE, the local weights file (README: "MR-MAE" says where '
                         f'to get it){tags}')
    if not Path(value).is_file():
        raise ValueError(f'{flag} {value}: no such file. Give the local weights file (README: "MR-MAE" says where '
                         f'to get it){tags}')
    return str(value), sha256(value)


def load_clip(args, grid):
    config = open_clip.get_model_config(args.clip_model)
    if config is None:
        raise ValueError(f'--clip_model {args.clip_model}: not an open_clip model name')
    weights, digest = weights_source('--clip_weights', args.clip_weights,
                                     open_clip.list_pretrained_tags_by_model(args.clip_model))
    patch = config['vision_cfg']['patch_size']
    try:  # open_clip resamples the position embedding to the new grid when it loads the weights
        visual = open_clip.create_model(args.clip_model, pretrained=weights, force_quick_gelu=args.clip_quick_gelu,
                                        force_image_size=(grid[0] * patch, grid[1] * patch)).visual
    except Exception as e:
        raise ValueError(f'--clip_weights {weights}: cannot load into {args.clip_model} ({str(e)[:200]})') from None
    teacher = ClipTeacher(visual, visual.image_mean, visual.image_std, patch, grid, visual.transformer.width)
    return teacher, dict(model=args.clip_model, weights=weights, sha256=digest)


def load_dino(args, grid):
    try:
        with torch.device('meta'):  # the architecture only, to learn its patch size
            patch = timm.create_model(args.dino_model).patch_embed.patch_size[0]
    except RuntimeError as e:
        raise ValueError(f'--dino_model {args.dino_model}: {e}') from None
    weights, digest = weights_source('--dino_weights', args.dino_weights, ['hub'])
    overlay = {} if weights == 'hub' else dict(pretrained_cfg_overlay=dict(file=weights))
    try:  # timm resamples the position embedding to img_size when it loads the weights
        backbone = timm.create_model(args.dino_model, pretrained=True, num_classes=0, img_size=grid[0] * patch,
                                     **overlay)
    except Exception as e:
        raise ValueError(f'--dino_weights {weights}: cannot load into {args.dino_model} ({str(e)[:200]})') from None
    cfg = backbone.pretrained_cfg
    teacher = TimmTeacher(backbone, cfg['mean'], cfg['std'], patch, grid, backbone.embed_dim,
                          backbone.num_prefix_tokens)
    return teacher, dict(model=args.dino_model, weights=weights, sha256=digest)


def load_own(path, grid):
    """An encoder trained here, from any of our checkpoints or exports: a ViT, or MCMAE's hybrid encoder, whose
    patch tokens are the last transformer block's output over the stage-3 grid (without the pre-training's
    multi-scale fusion, which belongs to MCMAE's reconstruction, as in its fine-tuning)."""
    weights, digest = weights_source('--teacher', path, [])
    state = read_encoder_state_dict(weights, hybrid=True)
    if 'patch_embed.stem1.proj.weight' in state:
        patch = 4 * state['patch_embed.stem1.proj.weight'].shape[-1]
        encoder, model = build_conv_vit(state, grid[0] * patch), 'mcmae'
    else:
        patch = state['patch_embed.proj.weight'].shape[-1]
        encoder, model = build_vit(state, grid[0] * patch), 'vit'
    teacher = OwnTeacher(encoder, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, patch, grid,
                         encoder.norm.normalized_shape[0], encoder.num_prefix_tokens)
    return teacher, dict(model=model, weights=weights, sha256=digest)


def save_standin_weights(folder, clip_model='ViT-S-16', dino_model='vit_small_patch16_224.dino'):
    """Randomly initialised teachers saved in the real file formats (an open_clip state dict, a timm state dict):
    tests and benchmarks load them through the real loaders on machines without the real weights."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clip_path, dino_path = folder / f'{clip_model}-standin.pth', folder / f'{dino_model}-standin.pth'
    torch.save(open_clip.create_model(clip_model, pretrained=None).state_dict(), clip_path)
    torch.save(timm.create_model(dino_model, pretrained=False, num_classes=0).state_dict(), dino_path)
    return clip_path, dino_path
