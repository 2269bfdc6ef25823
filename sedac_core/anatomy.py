"""Per-architecture access to a decoder-only transformer so the engine can run it layer by layer: embeddings,
decoder layers (as fused weight views), final norm, LM head and rotary tables. Llama, Mistral, Qwen2/Qwen3 and
Gemma (v1) share one code path; an architecture differs only in the few switches of its ArchSpec."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class ArchSpec:
    norm_offset: float = 0.0  # Gemma stores RMSNorm weights as (w - 1)
    embed_scale: bool = False  # Gemma multiplies embeddings by sqrt(hidden_size)
    qk_norm: bool = False  # Qwen3: RMSNorm on each query/key head before RoPE


ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec(),
    "mistral": ArchSpec(),
    "qwen2": ArchSpec(),
    "qwen3": ArchSpec(qk_norm=True),
    "gemma": ArchSpec(norm_offset=1.0, embed_scale=True),
}


def check_supported(config: Any) -> ArchSpec:
    model_type = getattr(config, "model_type", None)
    spec = ARCHS.get(model_type)
    if spec is None:
        raise UnsupportedArchitectureError(
            f"architecture '{model_type}' is not supported by the SEDAC engine (supported: {', '.join(ARCHS)}); "
            "use a model of a supported family"
        )
    return spec


class Layer:
    """One decoder layer's weights, as views into the model's own parameters (no copies)."""

    __slots__ = ("index", "in_norm", "post_norm", "qkv_w", "qkv_b", "o_w", "o_b", "gu_w", "gu_b", "down_w",
                 "down_b", "q_norm", "k_norm", "window")

    def __init__(self, index: int, **kw: Any) -> None:
        self.index = index
        for k, v in kw.items():
            setattr(self, k, v)


def _fuse_linears(linears: list[torch.nn.Linear], transposed: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the weights of linears that read the same input into one matrix, and point each module's
    parameters at views of it, so one matmul replaces several and no weight is held twice.

    With `transposed`, the matrix is stored input-major ([in, out] in memory, returned as its [out, in] view):
    on CPU a one-row matmul streams that layout about 1.6x faster than the usual [out, in] one (measured on
    SmolLM2's shapes: 17 vs 11 GB/s), and decoding is bound by exactly that read of the weights."""
    if transposed:
        storage = torch.cat([m.weight.data.t() for m in linears], dim=1).contiguous()  # [in, sum(out)]
        weight = storage.t()
    else:
        weight = torch.cat([m.weight.data for m in linears], dim=0).contiguous()
    has_bias = [m.bias is not None for m in linears]
    bias = None
    if any(has_bias):
        bias = torch.cat(
            [m.bias.data if m.bias is not None else torch.zeros(m.out_features, dtype=weight.dtype, device=weight.device)
             for m in linears]
        ).contiguous()
    row = 0
    for m in linears:
        n = m.out_features
        m.weight = torch.nn.Parameter(weight[row : row + n], requires_grad=False)
        if m.bias is not None and bias is not None:
            m.bias = torch.nn.Parameter(bias[row : row + n], requires_grad=False)
        row += n
    return weight, bias


def _relayout_lm_head(model: Any) -> None:
    """Store the LM head input-major too (shared with the embeddings when they are tied: a row lookup works on
    either layout)."""
    head = model.lm_head
    new = torch.nn.Parameter(head.weight.data.t().contiguous().t(), requires_grad=False)
    embed = model.get_input_embeddings()
    if embed.weight is head.weight:
        embed.weight = new
    head.weight = new


def wants_input_major(device: Any) -> bool:
    return torch.device(device).type == "cpu"


class Anatomy:
    """The model seen as a stack the engine can drive one layer at a time."""

    def __init__(self, model: Any, input_major: bool | None = None) -> None:
        """Wraps `model` for layer-by-layer decoding. On CPU (or with input_major=True) the weights are re-laid
        input-major in place (see _fuse_linears): the model stays usable, with the same values, by its own
        forward and generate, which then differ from a freshly loaded copy only by float rounding."""
        config = model.config
        self.spec = check_supported(config)
        self.config = config
        base = model.model
        device = next(model.parameters()).device
        self.input_major = wants_input_major(device) if input_major is None else input_major
        if self.input_major and not getattr(model, "_sedac_input_major", False):
            with torch.no_grad():
                _relayout_lm_head(model)
        self.embed_tokens = base.embed_tokens
        self.rotary_emb = base.rotary_emb
        self.final_norm_w = base.norm.weight
        self.lm_head_w = model.lm_head.weight
        self.lm_head_b = getattr(model.lm_head, "bias", None)
        self.num_layers = int(config.num_hidden_layers)
        self.hidden_size = int(config.hidden_size)
        self.num_heads = int(config.num_attention_heads)
        self.num_kv_heads = int(getattr(config, "num_key_value_heads", None) or self.num_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or self.hidden_size // self.num_heads)
        # every weight matmul of the stack and the LM head: F.linear, or matmul.linear_rows once the engine has
        # the skinny-matmul kernel (the same values up to float rounding; see SedacEngine._select_matmul)
        self.linear: Callable[..., torch.Tensor] = F.linear
        self.eps = float(getattr(config, "rms_norm_eps", 1e-6))
        self.scaling = self.head_dim**-0.5
        self.embed_multiplier = math.sqrt(self.hidden_size) if self.spec.embed_scale else 1.0
        from transformers.activations import ACT2FN

        act_name = getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", "silu")
        self.act = F.silu if act_name == "silu" else ACT2FN[act_name]
        layer_types = getattr(config, "layer_types", None)
        window = getattr(config, "sliding_window", None)
        if getattr(config, "model_type", "") == "qwen2" and not getattr(config, "use_sliding_window", False):
            window = None
        self.layers: list[Layer] = []
        with torch.no_grad():
            for i, mod in enumerate(base.layers):
                attn, mlp = mod.self_attn, mod.mlp
                qkv_w, qkv_b = _fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj], self.input_major)
                gu_w, gu_b = _fuse_linears([mlp.gate_proj, mlp.up_proj], self.input_major)
                if self.input_major and not getattr(model, "_sedac_input_major", False):
                    _fuse_linears([attn.o_proj], True)
                    _fuse_linears([mlp.down_proj], True)
                lwin = window
                if layer_types is not None and i < len(layer_types) and layer_types[i] != "sliding_attention":
                    lwin = None
                self.layers.append(
                    Layer(
                        i,
                        in_norm=mod.input_layernorm.weight,
                        post_norm=mod.post_attention_layernorm.weight,
                        qkv_w=qkv_w,
                        qkv_b=qkv_b,
                        o_w=attn.o_proj.weight,
                        o_b=attn.o_proj.bias,
                        gu_w=gu_w,
                        gu_b=gu_b,
                        down_w=mlp.down_proj.weight,
                        down_b=mlp.down_proj.bias,
                        q_norm=attn.q_norm.weight if self.spec.qk_norm else None,
                        k_norm=attn.k_norm.weight if self.spec.qk_norm else None,
                        window=int(lwin) if lwin else None,
                    )
                )
        model._sedac_input_major = self.input_major
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim

    # -- pieces -----------------------------------------------------------------------------------------------
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # the same arithmetic as the transformers modules (fp32 statistics), so outputs match them exactly
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.spec.norm_offset:
            return (h * (1.0 + weight.float())).to(dtype)
        return weight * h.to(dtype)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if self.spec.embed_scale:
            x = x * torch.tensor(self.embed_multiplier, dtype=x.dtype)
        return x

    def rope_tables(self, length: int, device: Any, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(length, device=device).unsqueeze(0)
        probe = torch.empty(1, dtype=dtype, device=device)
        cos, sin = self.rotary_emb(probe, positions)
        return cos[0].contiguous(), sin[0].contiguous()  # [length, head_dim]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head."""
        return self.linear(self.rms_norm(hidden, self.final_norm_w), self.lm_head_w, self.lm_head_b)

    def project_kv(self, layer: Layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer input x [B, T, hidden] -> (q, k, v) heads with RoPE applied: [B, heads, T, head_dim]."""
        B, T, _ = x.shape
        h = self.rms_norm(x, layer.in_norm)
        qkv = self.linear(h, layer.qkv_w, layer.qkv_b)
        q, k, v = qkv.split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if layer.q_norm is not None:
            q = self.rms_norm(q, layer.q_norm)
            k = self.rms_norm(k, layer.k_norm)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def layer_forward(self, layer: Layer, x: torch.Tensor, cache: Any, start: int,
                      cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run one decoder layer on the new tokens x [B, T, hidden] in cache slots start..start+T-1, writing their
        K/V into the cache and attending over the cache's slots 0..start+T-1: causally, or as `mask` [T, start+T]
        (bool, True: may attend) says, e.g. a tree of drafts whose rows see only their ancestors (cos/sin then
        carry each row's own position; layers with a sliding window take no mask)."""
        B, T, _ = x.shape
        q, k, v = self.project_kv(layer, x, cos, sin)
        end = start + T
        keys, values = cache.write(layer.index, start, k, v)
        lo = 0
        if layer.window is not None and end > layer.window:
            lo = max(0, start + 1 - layer.window) if T == 1 else 0
        keys = keys[:, :, lo:end]
        values = values[:, :, lo:end]
        if mask is not None:
            attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling,
                                                  enable_gqa=True)
        elif T == 1:
            attn = F.scaled_dot_product_attention(q, keys, values, scale=self.scaling, enable_gqa=True)
        elif start == 0 and layer.window is None:
            attn = F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=self.scaling,
                                                  enable_gqa=True)
        else:
            qpos = torch.arange(start, end, device=x.device).unsqueeze(1)
            kpos = torch.arange(lo, end, device=x.device).unsqueeze(0)
            mask = kpos <= qpos
            if layer.window is not None:
                mask &= kpos > qpos - layer.window
            attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling,
                                                  enable_gqa=True)
        return self.layer_output(layer, x, attn)

    def layer_output(self, layer: Layer, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The rest of a decoder layer once attention is done: attn [B, heads, T, head_dim] -> output projection,
        residual, MLP, residual."""
        B, T, _ = x.shape
        attn = attn.transpose(1, 2).reshape(B, T, self.q_size)
        x = x + self.linear(attn, layer.o_w, layer.o_b)
        h = self.rms_norm(x, layer.post_norm)
        gate, up = self.linear(h, layer.gu_w, layer.gu_b).chunk(2, dim=-1)
        return x + self.linear(self.act(gate) * up, layer.down_w, layer.down_b)

    def branch_layer_forward(self, layer: Layer, x: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor,
                             branch_k: torch.Tensor, branch_v: torch.Tensor, step: int,
                             cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """One decoder layer for n branches that share a cached prefix, one new token each (x [n, 1, hidden], all
        at position P + step, P = prefix length). The prefix K/V [1, kv_heads, P, head_dim] are read, never
        written or copied per branch: all branches' queries meet them in one matmul per KV head. The branches' own
        K/V for steps 0..step live in branch_k/branch_v [n, kv_heads, >step, head_dim]; this step's are written
        there. The same arithmetic as layer_forward (up to float rounding), without touching the cache."""
        n = x.shape[0]
        P = prefix_k.shape[2]
        q, k, v = self.project_kv(layer, x, cos, sin)
        branch_k[:, :, step] = k[:, :, 0]
        branch_v[:, :, step] = v[:, :, 0]
        lo = 0  # the first position this query may see (sliding-window layers)
        if layer.window is not None:
            lo = max(0, P + step + 1 - layer.window)
        kp, vp = prefix_k[0, :, min(lo, P):], prefix_v[0, :, min(lo, P):]  # [kv_heads, P', head_dim]
        first = max(0, lo - P)
        kb, vb = branch_k[:, :, first : step + 1], branch_v[:, :, first : step + 1]  # [n, kv_heads, S, head_dim]
        hk, g, d = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        qg = q.view(n, hk, g, d)  # query head j*g+i reads KV head j, as SDPA's grouped-query attention does
        rows = qg.permute(1, 0, 2, 3).reshape(hk, n * g, d)  # every branch's queries of one KV head: one matmul
        s_prefix = torch.matmul(rows, kp.transpose(-1, -2)).view(hk, n, g, -1).permute(1, 0, 2, 3)
        s_branch = torch.matmul(qg, kb.transpose(-1, -2))
        scores = torch.cat((s_prefix, s_branch), dim=-1).float() * self.scaling
        p = torch.softmax(scores, dim=-1).to(q.dtype)
        Pp = kp.shape[1]
        p_prefix = p[..., :Pp].permute(1, 0, 2, 3).reshape(hk, n * g, Pp)
        out = torch.matmul(p_prefix, vp).view(hk, n, g, d).permute(1, 0, 2, 3)
        out = out + torch.matmul(p[..., Pp:], vb)
        return self.layer_output(layer, x, out.reshape(n, hk * g, 1, d))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding, as transformers applies it (rotate-half form)."""
    return x * cos + _rotate_half(x) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
