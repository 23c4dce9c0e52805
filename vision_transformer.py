"""Vision Transformer and DINO projection head, with DINO's parameter names.

The module layout and the parameter names are exactly those of facebookresearch/dino (and therefore of the
published DINO-MC checkpoints): ``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.N.{norm1, attn.qkv,
attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``; ``head.mlp.{0,2,4}`` and ``head.last_layer.weight_{g,v}``.
Differences from the original code, none of which changes the maths or the checkpoint format:

- attention runs through ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient
  kernels where the device has them) instead of an explicit softmax(QK^T) matrix, except in bf16/fp16 on a
  CPU, where the explicit product is faster (``attention``);
- dropout layers with probability 0 (DINO's defaults) are ``nn.Identity``: ``nn.Dropout(0.0)`` still copies
  its input, once per layer and token;
- any number of input channels (``in_chans``), for multispectral Sentinel-2 input;
- ``forward_packed`` runs crops of several sizes through the blocks in one pass (sequence packing), which
  DINO-MC's multi-crop wrapper uses instead of one pass per crop size.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_


def dropout(p: float) -> nn.Module:
    """``nn.Dropout(p)``, or ``nn.Identity`` for p == 0: a zero-probability dropout still copies its input."""
    return nn.Dropout(p) if p > 0.0 else nn.Identity()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over (B, heads, N, d) tensors.

    Why two paths: on a CPU in bf16/fp16, PyTorch's fused (flash) attention kernel is slower than the explicit
    matrix products for ViT sequence lengths, above all in the backward pass (benchmarks/README.md); everywhere
    else the fused kernel is the faster one and never stores the (N, N) matrix.
    """
    if q.device.type != "cpu" or q.dtype == torch.float32:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    attn = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
    return F.dropout(attn, dropout_p) @ v if dropout_p > 0.0 else attn @ v


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = dropout(proj_drop)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self._qkv(x)
        x = attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))

    def forward_packed(self, x: torch.Tensor, segments: list[tuple[int, int]]) -> torch.Tensor:
        """Attention over packed tokens: ``x`` (T, C) holds groups of B sequences of N tokens end to end.

        The qkv and output projections run once over all T tokens; attention runs per group, so a token only
        attends to the tokens of its own crop (exactly what ``forward`` computes per group).
        """
        T, C = x.shape
        qkv = self.qkv(x)
        dropout_p = self.attn_drop if self.training else 0.0
        out = []
        # split, not slicing: its backward is one concatenation instead of a zero-filled (T, 3C) gradient per group
        for part, (B, N) in zip(qkv.split([B * N for B, N in segments]), segments):
            q, k, v = part.view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
            out.append(attention(q, k, v, dropout_p).transpose(1, 2).reshape(B * N, C))
        return self.proj_drop(self.proj(torch.cat(out)))

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """The softmax attention matrix (B, heads, N, N); SDPA does not expose it, so it is computed here."""
        q, k, _ = self._qkv(x)
        return ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


class Block(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer=nn.LayerNorm,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def forward_packed(
        self, x: torch.Tensor, segments: list[tuple[int, int]], sample_index: torch.Tensor
    ) -> torch.Tensor:
        """``forward`` on packed tokens (T, C): norms and MLP are token-wise, so they run once on all tokens.
        ``sample_index``: :func:`packed_sample_index` of ``segments``, built once by the caller for all blocks."""
        x = self._packed_residual(x, self.attn.forward_packed(self.norm1(x), segments), segments, sample_index)
        return self._packed_residual(x, self.mlp(self.norm2(x)), segments, sample_index)

    def _packed_residual(
        self,
        x: torch.Tensor,
        branch: torch.Tensor,
        segments: list[tuple[int, int]],
        sample_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x + drop_path(branch), with timm's DropPath per sample: its keep/scale factor gathered for every token
        from its sample (``sample_index``) and applied in the same pass as the residual sum (one ``addcmul``
        instead of a multiply and an add over the (T, C) tokens)."""
        if not self.training or not isinstance(self.drop_path, DropPath) or self.drop_path.drop_prob == 0.0:
            return x + branch
        keep_prob = 1.0 - self.drop_path.drop_prob
        scale = x.new_empty(sum(B for B, _ in segments)).bernoulli_(keep_prob)
        if keep_prob > 0.0 and self.drop_path.scale_by_keep:
            scale.div_(keep_prob)
        if sample_index is None:
            sample_index = packed_sample_index(segments, x.device)
        return torch.addcmul(x, branch, scale[sample_index].unsqueeze(1))


def packed_sample_index(segments: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
    """(T,) index of the sample each packed token belongs to, for ``segments`` [(B, N), ...] laid end to end.

    Built on ``device`` from Python ints only (arange, expand): no tensor is copied from the host, so on CUDA
    nothing waits for the GPU. A ``torch.tensor(list, device=...)`` here cost a blocking host-to-device copy
    per block and residual (24 per ViT-S student step); the caller builds this once per packed forward.
    """
    parts, start = [], 0
    for B, N in segments:
        parts.append(torch.arange(start, start + B, device=device).unsqueeze(1).expand(B, N).reshape(-1))
        start += B
    return torch.cat(parts)


class PatchEmbed(nn.Module):
    """Image to patch embedding: a strided convolution, the patch grid flattened into a token sequence."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H // p * W // p, D): the convolution computed as one matrix product on the patches.

        Why: a convolution whose kernel equals its stride is a linear layer on non-overlapping patches, and the
        matrix product is the faster of the two on a CPU for DINO-MC's crop sizes, in bf16 and in fp32
        (benchmarks/README.md). The weights stay the convolution's, so checkpoints keep DINO's
        ``patch_embed.proj`` keys and shapes.
        """
        B, C, H, W = x.shape
        p = self.patch_size
        h, w = H // p, W // p
        patches = x[:, :, : h * p, : w * p].reshape(B, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5)
        return F.linear(patches.reshape(B, h * w, C * p * p), self.proj.weight.flatten(1), self.proj.bias)


class VisionTransformer(nn.Module):
    """DINO's ViT: pre-norm blocks, CLS token output after the final LayerNorm."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer=None,
    ):
        super().__init__()
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        self.num_features = self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.pos_drop = dropout(drop_rate)
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]  # stochastic depth decay rule
        self.blocks = nn.ModuleList(
            [
                Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, dpr[i], norm_layer)
                for i in range(depth)
            ]
        )
        self.norm = norm_layer(embed_dim)
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def interpolate_pos_encoding(self, height: int, width: int) -> torch.Tensor:
        """Position embeddings for a ``height`` x ``width`` pixel input, computed exactly as DINO computes them.

        DINO (and the published DINO-MC code) call bicubic ``F.interpolate`` with a SCALE FACTOR of
        ``(grid + 0.1) / sqrt(N)``, not with the target size: the factor fixes where the source grid is sampled
        (``(i + 0.5) / scale - 0.5``), so interpolating to the size instead gives other embeddings for every
        non-224 crop (1-3 % of the features). The +0.1 keeps ``floor(sqrt(N) * scale)`` at the grid size.
        As in DINO, only a square input with the trained patch count uses the embeddings as they are.
        """
        num_patches = self.pos_embed.shape[1] - 1
        h_patches, w_patches = height // self.patch_size, width // self.patch_size
        if h_patches * w_patches == num_patches and height == width:
            return self.pos_embed
        side = math.sqrt(num_patches)
        dim = self.pos_embed.shape[-1]
        grid = self.pos_embed[:, 1:].reshape(1, int(side), int(side), dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((h_patches + 0.1) / side, (w_patches + 0.1) / side), mode="bicubic")
        patch_pos = grid.permute(0, 2, 3, 1).reshape(1, h_patches * w_patches, dim)
        return torch.cat((self.pos_embed[:, :1], patch_pos), dim=1)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens + CLS + position embeddings. Sizes that are not a multiple of the patch size (DINO-MC's
        164 px crops with patch 8 or 16) lose their last partial row/column of pixels, as in DINO's convolution."""
        B, _, H, W = x.shape
        tokens = self.patch_embed(x)
        tokens = torch.cat((self.cls_token.expand(B, -1, -1), tokens), dim=1)
        tokens = tokens + self.interpolate_pos_encoding(H, W)
        return self.pos_drop(tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prepare_tokens(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 0]

    def forward_packed(self, crops: list[torch.Tensor]) -> torch.Tensor:
        """CLS features of several batches of crops of different sizes (in order), in ONE pass through the blocks.

        Why: DINO-MC's local crops all differ in size, so ``forward`` per size runs the twelve blocks seven times
        on small batches. Every operation of a block but attention is token-wise, so the tokens of all crops are
        laid end to end in one (T, D) matrix: each linear layer, norm and MLP runs once, with bigger matrix
        products and seven times fewer calls; attention runs per crop size over its own tokens. The result is
        ``torch.cat([self(x) for x in crops])`` up to floating-point rounding.
        """
        tokens = [self.prepare_tokens(x) for x in crops]
        segments = [(t.shape[0], t.shape[1]) for t in tokens]
        x = torch.cat([t.reshape(-1, self.embed_dim) for t in tokens])
        sample_index = packed_sample_index(segments, x.device)  # once for all blocks
        for blk in self.blocks:
            x = blk.forward_packed(x, segments, sample_index)
        cls_rows, start = [], 0
        for B, N in segments:
            cls_rows.append(torch.arange(start, start + B * N, N, device=x.device))
            start += B * N
        return self.norm(x[torch.cat(cls_rows)])

    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention matrix of the last block, (B, heads, 1 + N, 1 + N); row 0 is the CLS token's attention."""
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        return self.blocks[-1].attn.attention_map(self.blocks[-1].norm1(x))

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        """Normalised token outputs (B, 1 + N, D) of the last ``n`` blocks (DINO's linear-probe features)."""
        x = self.prepare_tokens(x)
        output = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if len(self.blocks) - i <= n:
                output.append(self.norm(x))
        return output


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.LayerNorm):
        nn.init.constant_(m.bias, 0)
        nn.init.constant_(m.weight, 1.0)


def vit_tiny(patch_size: int = 16, **kwargs) -> VisionTransformer:
    return VisionTransformer(patch_size=patch_size, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4, **kwargs)


def vit_small(patch_size: int = 16, **kwargs) -> VisionTransformer:
    return VisionTransformer(patch_size=patch_size, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4, **kwargs)


def vit_base(patch_size: int = 16, **kwargs) -> VisionTransformer:
    return VisionTransformer(patch_size=patch_size, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4, **kwargs)


class WeightNormLinear(nn.Module):
    """``nn.utils.weight_norm(nn.Linear(in, out, bias=False))`` written out.

    DINO checkpoints store the last layer as ``weight_g`` (out, 1) and ``weight_v`` (out, in). Writing the
    reparametrisation here keeps those names on every torch version (the old ``weight_norm`` hook is
    deprecated; its replacement stores different keys), and keeps the maths: W = g * v / ||v|| per row.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _WeightNormLinearFn.apply(x, self.weight_v, self.weight_g)


def backward_dtype(product: torch.Tensor, grad_out: torch.Tensor) -> torch.dtype:
    """The dtype of :class:`_WeightNormLinearFn`'s two backward products: the forward's on a GPU (as autocast
    would run them), fp32 on a CPU, where casting the (out, in) weight to bf16 costs as much as the fp32 product
    for a few dozen rows. Its own function so that tests can run the GPU's choice on a CPU."""
    return product.dtype if grad_out.is_cuda else torch.promote_types(product.dtype, torch.float32)


class _WeightNormLinearFn(torch.autograd.Function):
    """x @ (g * v / ||v||)^T computed as (x @ v^T) * (g / ||v||)^T, with the backward written out.

    Why: the normalised (out, in) weight (16.7M values for DINO's 65536 prototypes) is never materialised,
    and the gradient of the row norms is one ``addcmul_`` into dL/dv, where autograd's norm backward makes four
    more passes over the (out, in) matrix (divide, multiply, mask zero norms, add).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight_v: torch.Tensor, weight_g: torch.Tensor) -> torch.Tensor:
        norm = weight_v.norm(dim=1)
        product = F.linear(x, weight_v)
        ctx.save_for_backward(x, weight_v, weight_g, norm, product)
        return product * (weight_g.squeeze(1) / norm)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight_v, weight_g, norm, product = ctx.saved_tensors
        scale = weight_g.squeeze(1) / norm
        grad_scale = (grad_out * product).sum(dim=0)
        dtype = backward_dtype(product, grad_out)
        grad_product = (grad_out * scale).to(dtype)
        grad_x = grad_v = grad_g = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_product @ weight_v.to(dtype)
        if ctx.needs_input_grad[1]:
            grad_v = (grad_product.t() @ x.to(dtype)).to(weight_v.dtype)
            # d(g / ||v||) / dv = -(g / ||v||) * v / ||v||^2, row by row
            grad_v.addcmul_((-grad_scale * scale / norm.square()).unsqueeze(1), weight_v)
        if ctx.needs_input_grad[2]:
            grad_g = (grad_scale / norm).unsqueeze(1).to(weight_g.dtype)
        return grad_x, grad_v, grad_g


class DINOHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> weight-normalised prototypes, as in DINO."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
    ):
        super().__init__()
        self.in_dim = in_dim  # the backbone's feature size
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            for _ in range(nlayers - 2):
                layers.append(nn.Linear(hidden_dim, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(_init_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        # nn.Linear's default init for the prototypes, as DINO gets it before weight_norm wraps the layer.
        nn.init.kaiming_uniform_(self.last_layer.weight_v, a=math.sqrt(5))
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)
