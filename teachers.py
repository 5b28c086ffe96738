"""
Encoders in weight files, and frozen teachers, in one place for every method and script.

Reading: an encoder's weights from a checkpoint of any layout met in practice (ours, official MAE, dBOT and ConvMAE,
timm, DINO), and the ViT or MCMAE hybrid encoder those weights imply (finetune.py, dBOT's file teachers, MR-MAE's).
Teachers: CLIP through open_clip, DINO through timm, and encoders trained here (train.py checkpoints of any method:
ViTs, and MCMAE's hybrid encoder; dBOT teacher-stageK.pth files). Each is wrapped so that it sees the full image
re-normalised to its own mean/std at the size that puts its token grid on the student's, and each file is recorded
with its SHA-256, so that a resumed run can insist on the same teachers. Used by mrmae.py (MR-MAE and MR-MCMAE), by
dbot.py's file and CLIP teachers, and by the scripts; knows no method. open_clip is imported only for a CLIP teacher.
"""

import argparse
import hashlib
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import safetensors.torch
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from mae import VIT_SIZES, ViT, encoder_state_dict
from mcmae import ConvViT


# -----------------------------------------------------------------------------------------------------------------
# Encoders in weight files

def load_weights_file(path):
    """A checkpoint or state dict as saved by torch.save (loaded without running pickled code), or a .safetensors
    file (timm's and the Hugging Face hub's format), told apart by their content, not their names. torch.save's zip
    archive has a CRC-32 per record, which torch.load does not check: they are checked here first, so that a flipped
    bit is a damaged file, not a NaN many steps later."""
    if not Path(path).exists():
        raise ValueError(f'no such file: {path}')
    if not Path(path).is_file():  # a folder, or a named pipe that would block the read
        raise ValueError(f'{path} is not a regular file')
    with open(path, 'rb') as f:
        head = f.read(9)
    if head[:2] != b'PK' and head[8:9] == b'{':  # safetensors: an 8-byte header length, then its JSON header
        return safetensors.torch.load_file(path)
    if head[:2] == b'PK':
        damaged = zipfile.ZipFile(path).testzip()
        if damaged:
            raise ValueError(f'the file is damaged: its record {damaged} fails its CRC-32 check (a flipped bit, a copy '
                             f'cut short or altered)')
    elif head[:1] != b'\x80':  # torch.save writes a zip archive, or (its legacy format) a pickle
        raise ValueError('it is neither a file of torch.save nor a .safetensors file')
    try:  # torch's warnings and advice (weights_only=False would run the file's code) are not for this file's user
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.filterwarnings('ignore', message='Detected pickle protocol')
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        named = re.search(r'GLOBAL (\S+)', str(e))
        raise ValueError('it holds more than tensors and plain values' + (f' (a {named[1]})' if named else '')) \
            from None


# The official ConvMAE code (Alpha-VL/ConvMAE, vision_transformer.py and models_convmae.py) names the hybrid
# encoder's parts by stage; ours nests the convolution stages under patch_embed (mcmae.ConvStages). Same tensors.
CONVMAE_NAMES = [('patch_embed1.', 'patch_embed.stem1.'), ('blocks1.', 'patch_embed.stage1.'),
                 ('patch_embed2.', 'patch_embed.stem2.'), ('blocks2.', 'patch_embed.stage2.'),
                 ('patch_embed3.', 'patch_embed.'), ('patch_embed4.', 'patch_embed.linear.'), ('blocks3.', 'blocks.'),
                 ('stage1_output_decode.', 'fuse1.'), ('stage2_output_decode.', 'fuse2.')]


def from_official_convmae(state):
    """An official ConvMAE state dict (pre-trained, or fine-tuned) under our MCMAE names."""
    def rename(key):
        return next((ours + key.removeprefix(theirs) for theirs, ours in CONVMAE_NAMES if key.startswith(theirs)), key)
    return {rename(key): value for key, value in state.items()}


def read_encoder_state_dict(path, hybrid=False, classifier=False):
    """The encoder weights in a checkpoint file of any layout met in practice: ours (train.py checkpoints, dBOT
    teacher files, finetune.py's linear probes), official MAE and dBOT ({'model': ...}), timm and DINO state dicts
    (flat), DINO training checkpoints ({'teacher': ...} with 'module.backbone.' prefixes); with hybrid=True MCMAE's
    hybrid encoder too (its conv stages under patch_embed.stem1...), ours or the official ConvMAE code's; with
    classifier=True a fine-tuned classifier's encoder too, which has no final norm. Raises ValueError naming the
    problem."""
    try:
        checkpoint = load_weights_file(path)
    except FileNotFoundError:
        raise ValueError(f'{path}: no such file') from None
    except Exception as e:
        raise ValueError(f'{path}: not a readable checkpoint ({type(e).__name__}: {str(e)[:200]})') from None
    for key in ('model', 'teacher', 'state_dict'):
        if isinstance(checkpoint, dict) and key in checkpoint:
            checkpoint = checkpoint[key]
            break
    if not isinstance(checkpoint, dict):
        raise ValueError(f'{path}: holds no state dict')
    # DDP's and DINO's prefixes; finetune.py's classifiers hold their encoder under 'encoder.'
    state = {k.removeprefix('module.').removeprefix('backbone.').removeprefix('encoder.'): v
             for k, v in checkpoint.items()}
    if 'patch_embed1.proj.weight' in state:  # the official ConvMAE code's names
        state = from_official_convmae(state)
    if not hybrid and any(key.startswith('patch_embed.stem1.') for key in state):
        raise ValueError(f'{path}: an MCMAE encoder (convolution stages before the transformer), which cannot serve '
                         f'as a ViT; use a checkpoint of mae, mrmae or dbot')
    if 'patch_embed.proj.weight' not in state:
        raise ValueError(f'{path}: not a ViT encoder (no patch_embed.proj.weight among its keys)')
    if 'norm.weight' not in state and not classifier:  # timm's global_pool='avg' layout, as finetune.py writes it
        raise ValueError(f'{path}: a fine-tuned classifier, whose encoder has no final norm (fc_norm and a head '
                         f'replaced it): use the pre-trained checkpoint it was fine-tuned from, or a linear probe\'s')
    return encoder_state_dict(state)


def resize_pos_embed(pos_embed, grid_size, num_prefix_tokens=1):
    """Bicubic resampling of a (1, prefix + N, D) position embedding from its square grid to grid_size, e.g. for a
    teacher trained at 224 px used on 64 px images (MAE fine-tuning does the same at a new resolution)."""
    n = pos_embed.shape[1] - num_prefix_tokens
    if n == grid_size[0] * grid_size[1]:
        return pos_embed
    side = int(n ** 0.5)
    patches = pos_embed[:, num_prefix_tokens:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches.float(), size=grid_size, mode='bicubic', align_corners=False)
    patches = patches.flatten(2).transpose(1, 2).to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :num_prefix_tokens], patches], dim=1)


def default_heads(embed_dim):
    """The heads of the standard ViT of that width (weights cannot tell them), else one per 64 channels."""
    return next((size['num_heads'] for size in VIT_SIZES.values() if size['embed_dim'] == embed_dim),
                max(1, embed_dim // 64))


def build_vit(state_dict, img_size, vit_class=ViT, num_heads=None):
    """A ViT with the architecture that state_dict implies (width, depth, patch and MLP size; the heads, which
    weights cannot tell, from num_heads or else the standard size of that width), holding those weights."""
    weight = state_dict['patch_embed.proj.weight']  # (D, 3, p, p)
    embed_dim, patch_size = weight.shape[0], weight.shape[-1]
    depth = len({key.split('.')[1] for key in state_dict if key.startswith('blocks.')})
    mlp_ratio = state_dict['blocks.0.mlp.fc1.weight'].shape[0] / embed_dim if depth else 4.0
    num_heads = num_heads or default_heads(embed_dim)
    model = vit_class(img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio)
    state_dict = dict(state_dict, pos_embed=resize_pos_embed(state_dict['pos_embed'], model.grid_size))
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:  # names every missing, unexpected or mis-shaped key
        raise ValueError(f'weights do not fit a ViT of width {embed_dim}, depth {depth}, patch {patch_size}: '
                         + ' '.join(str(e).split())) from None
    return model


def build_conv_vit(state_dict, img_size):
    """A ConvViT with the sizes that an MCMAE encoder's weights imply (width, transformer depth, overall stride, MLP
    size; the heads from the standard size of that width), holding those weights: e.g. as a teacher (load_own)."""
    embed_dim = state_dict['patch_embed.proj.weight'].shape[0]  # the stage-3 embedding's output width
    patch_size = 4 * state_dict['patch_embed.stem1.proj.weight'].shape[-1]  # the stem's stride is a quarter of it
    blocks = len({key.split('.')[1] for key in state_dict if key.startswith('blocks.')})
    mlp_ratio = state_dict['blocks.0.mlp.fc1.weight'].shape[0] / embed_dim if blocks else 4.0
    model = ConvViT(img_size, patch_size, embed_dim, blocks + 1, default_heads(embed_dim), mlp_ratio)
    state_dict = dict(state_dict, pos_embed=resize_pos_embed(state_dict['pos_embed'], model.grid_size, 0))
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:  # names every missing, unexpected or mis-shaped key
        raise ValueError(f'weights do not fit an MCMAE encoder of width {embed_dim}, {blocks} transformer blocks, '
                         f'stride {patch_size}: ' + ' '.join(str(e).split())) from None
    return model


# -----------------------------------------------------------------------------------------------------------------
# Frozen teachers


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


def load_clip(grid, clip_model='ViT-B-16', clip_weights=None, clip_quick_gelu=True):
    """CLIP's image tower (open_clip) from a local weights file, its position code resampled to put its token grid on
    `grid`. clip_quick_gelu: OpenAI's weights (the papers') need QuickGELU. -> (ClipTeacher, its source)."""
    import open_clip  # only for a CLIP teacher: nothing else here needs it installed
    config = open_clip.get_model_config(clip_model)
    if config is None:
        raise ValueError(f'--clip_model {clip_model}: not an open_clip model name')
    tags = open_clip.list_pretrained_tags_by_model(clip_model)
    weights, digest = weights_source('--clip_weights', clip_weights, tags)
    patch = config['vision_cfg']['patch_size']
    try:  # open_clip resamples the position embedding to the new grid when it loads the weights
        visual = open_clip.create_model(clip_model, pretrained=weights, force_quick_gelu=clip_quick_gelu,
                                        force_image_size=(grid[0] * patch, grid[1] * patch)).visual
    except Exception as e:
        raise ValueError(f'--clip_weights {weights}: cannot load into {clip_model} ({str(e)[:200]})') from None
    teacher = ClipTeacher(visual, visual.image_mean, visual.image_std, patch, grid, visual.transformer.width)
    return teacher, dict(model=clip_model, weights=weights, sha256=digest)


def load_dino(grid, dino_model='vit_base_patch16_224.dino', dino_weights=None):
    """DINO's ViT (timm) from a local weights file (or "hub"), resampled to put its token grid on `grid`."""
    try:
        with torch.device('meta'):  # the architecture only, to learn its patch size
            patch = timm.create_model(dino_model).patch_embed.patch_size[0]
    except RuntimeError as e:
        raise ValueError(f'--dino_model {dino_model}: {e}') from None
    weights, digest = weights_source('--dino_weights', dino_weights, ['hub'])
    overlay = {} if weights == 'hub' else dict(pretrained_cfg_overlay=dict(file=weights))
    try:  # timm resamples the position embedding to img_size when it loads the weights
        backbone = timm.create_model(dino_model, pretrained=True, num_classes=0, img_size=grid[0] * patch, **overlay)
    except Exception as e:
        raise ValueError(f'--dino_weights {weights}: cannot load into {dino_model} ({str(e)[:200]})') from None
    cfg = backbone.pretrained_cfg
    teacher = TimmTeacher(backbone, cfg['mean'], cfg['std'], patch, grid, backbone.embed_dim,
                          backbone.num_prefix_tokens)
    return teacher, dict(model=dino_model, weights=weights, sha256=digest)


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
    import open_clip
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clip_path, dino_path = folder / f'{clip_model}-standin.pth', folder / f'{dino_model}-standin.pth'
    torch.save(open_clip.create_model(clip_model, pretrained=None).state_dict(), clip_path)
    torch.save(timm.create_model(dino_model, pretrained=False, num_classes=0).state_dict(), dino_path)
    return clip_path, dino_path
