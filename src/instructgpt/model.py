"""The Transformer models: a decoder-only GPT (GPT-2 style and Llama style), an encoder-decoder, and a
scalar head for reward and value models.

Modules in reading order: norms and rotary embeddings -> Attention -> MLP -> Block -> ModelConfig ->
Transformer (the trunk) -> GPT (trunk + unembedding) -> ScalarModel (trunk + one value per position) ->
Seq2Seq (encoder + decoder with cross-attention).

Shapes: B batch, T query time, S key time, C channels (n_embd), H heads, K key/value heads, D head size,
V vocabulary.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError


@dataclass
class ModelConfig:
    """Shape and family of a model. Two families: GPT-2 style (learned positions, LayerNorm, GELU MLP,
    biases, tied embeddings) and Llama style (RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases).
    Each switch is its own field so that imported checkpoints can mix them as their configs say."""

    vocab_size: int = 50257  # tokens the tokenizer produces; the embedding is padded past it (see padded_vocab)
    block_size: int = 1024  # longest sequence the model accepts (learned positions / RoPE table length)
    n_layer: int = 12  # decoder blocks (for seq2seq: decoder blocks)
    n_head: int = 12  # query heads
    n_kv_head: int | None = None  # key/value heads for grouped-query attention; None means n_head
    n_embd: int = 768  # residual stream width C
    intermediate_size: int | None = None  # MLP hidden width; None means 4C (gelu) or 8C/3 rounded (swiglu)
    arch: Literal["gpt", "seq2seq"] = "gpt"  # decoder-only, or encoder-decoder with cross-attention
    n_encoder_layer: int = 0  # encoder blocks (seq2seq only; 0 means n_layer)
    position: Literal["learned", "rope"] = "learned"  # absolute learned embeddings (GPT-2) or rotary (Llama)
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    mlp: Literal["gelu", "swiglu"] = "gelu"
    bias: bool = True  # biases in linear layers and LayerNorm (GPT-2 has them, Llama does not)
    tie_embeddings: bool = True  # the unembedding shares the token embedding's weights
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # long-context RoPE: {"rope_type": "llama3" or "linear", "factor", ...}
    attention_bias: bool | None = None  # bias on the q/k/v projection only (Qwen2); None means `bias`
    head_size: int | None = None  # D when it is not n_embd / n_head (Qwen3, Mistral-Nemo); None means that
    qk_norm: bool = False  # RMSNorm over each head's queries and keys before RoPE (Qwen3)
    dropout: float = 0.0  # residual and embedding dropout (the InstructGPT SFT used 0.2)
    attn_dropout: float = 0.0  # dropout on attention probabilities
    vocab_multiple: int = 64  # pad the embedding rows to a multiple of this (faster matmuls)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        kv = self.kv_heads
        checks = [
            (self.vocab_size > 0, f"vocab_size must be positive, got {self.vocab_size}"),
            (self.block_size > 0, f"block_size must be positive, got {self.block_size}"),
            (self.n_layer > 0 and self.n_head > 0, "n_layer and n_head must be positive"),
            (self.head_size is not None or self.n_embd % self.n_head == 0,
             f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}) unless head_size is given"),
            (self.head_size is None or self.head_size > 0, f"head_size must be positive, got {self.head_size}"),
            (self.n_head % kv == 0, f"n_head ({self.n_head}) must be divisible by n_kv_head ({kv})"),
            (self.position != "rope" or self.head_dim % 2 == 0,
             f"RoPE needs an even head size, got {self.head_dim}"),
            (0.0 <= self.dropout < 1.0 and 0.0 <= self.attn_dropout < 1.0, "dropout must be in [0, 1)"),
            (self.arch in ("gpt", "seq2seq"), f"arch must be 'gpt' or 'seq2seq', got {self.arch!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"invalid model config: {message}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.head_size or self.n_embd // self.n_head

    @property
    def hidden_dim(self) -> int:
        if self.intermediate_size:
            return self.intermediate_size
        if self.mlp == "gelu":
            return 4 * self.n_embd
        return 64 * math.ceil(8 * self.n_embd / 3 / 64)  # Llama's 2/3 of 4C, rounded up to a multiple of 64

    @property
    def padded_vocab(self) -> int:
        m = self.vocab_multiple
        return m * math.ceil(self.vocab_size / m)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown model config field(s): {', '.join(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def gpt2(cls, **overrides) -> ModelConfig:
        return cls(**overrides)

    @classmethod
    def llama(cls, **overrides) -> ModelConfig:
        base = dict(position="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False,
                    norm_eps=1e-6)
        return cls(**{**base, **overrides})


PRESETS: dict[str, dict] = {
    # A few minutes of CPU pretraining on the instruction world.
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=256),
    # One GPU, a few minutes.
    "small": dict(n_layer=8, n_head=8, n_embd=512, block_size=512),
    # GPT-2 small: 124M parameters.
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304),
}


# ----------------------------------------------------------------------------------------------------
# Norms and rotary position embeddings


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 as Llama does, then cast back: bf16 sums of squares lose precision.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (D/2,), with the Llama-3 or linear scaling of long-context checkpoints."""
    D = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(is_mid, mid, scaled)
    elif kind not in (None, "default"):
        raise UserError(f"unsupported rope_scaling type {kind!r} (supported: linear, llama3)")
    return inv_freq.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + D/2) of x (B, H, T, D) by the angles in cos/sin (B, 1, T, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


# ----------------------------------------------------------------------------------------------------
# Attention, MLP, Block


class KVCache:
    """Preallocated keys and values for every layer: (B, K, S_max, D) each, written in place.

    Two ways to read it back. By default attention sees the filled prefix (B, K, length + T, D), and the
    caller's 2-D mask covers exactly those keys. With `fixed_shape = True` attention sees all S_max slots
    and the caller passes a 4-D mask (B, 1, T, S_max) that hides the slots not yet written: every decode
    step then has the same shapes (what CUDA graphs and torch.compile want), and nothing is re-sliced."""

    def __init__(self, n_layer: int, B: int, K: int, S_max: int, D: int, device, dtype):
        self.k = torch.zeros(n_layer, B, K, S_max, D, device=device, dtype=dtype)
        self.v = torch.zeros(n_layer, B, K, S_max, D, device=device, dtype=dtype)
        self.length = 0  # positions filled so far (the same for every row; padding is masked instead)
        self.fixed_shape = False  # attend over every slot (the mask hides unwritten ones); see above

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.size(2)
        start = self.length
        self.k[layer, :, :, start:start + T] = k
        self.v[layer, :, :, start:start + T] = v
        if self.fixed_shape:
            return self.k[layer], self.v[layer]
        return self.k[layer, :, :, :start + T], self.v[layer, :, :, :start + T]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout_p: float,
              is_causal: bool, gqa: bool) -> torch.Tensor:
    """Scaled dot-product attention of q (B, H, T, D) over k, v (B, K, S, D) -> (B, H, T, D).

    bf16 on the CPU (autocast, or bf16 weights) attends in fp32 and returns bf16: PyTorch's bf16 CPU kernels
    for attention are about 3x slower than its fp32 ones at these sizes, while the matmuls around them are
    where bf16 pays (AMX / AVX-512 BF16 through oneDNN). It is also the more exact of the two."""
    upcast = q.device.type == "cpu" and q.dtype == torch.bfloat16
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    if mask is not None and mask.is_floating_point() and mask.dtype != q.dtype:
        mask = mask.to(q.dtype)  # an additive mask must match the queries' dtype (autocast)
    with torch.autocast("cpu", enabled=False) if upcast else contextlib.nullcontext():
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                           enable_gqa=gqa)
    return y.to(torch.bfloat16) if upcast else y


class Attention(nn.Module):
    """Multi-head attention with a fused projection: self-attention (q, k, v from x, causal or not) or
    cross-attention (q from x, k and v from the encoder output). Grouped-query when n_kv_head < n_head."""

    def __init__(self, cfg: ModelConfig, cross: bool = False):
        super().__init__()
        self.H, self.K, self.D = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.cross = cross
        qkv_bias = cfg.bias if cfg.attention_bias is None else cfg.attention_bias
        C = cfg.n_embd
        if cross:
            self.q_proj = nn.Linear(C, self.H * self.D, bias=qkv_bias)
            self.kv_proj = nn.Linear(C, 2 * self.K * self.D, bias=qkv_bias)
        else:
            # One matmul for q, k and v: (C -> 3C), or (C -> (H + 2K) D) with grouped-query attention.
            self.qkv_proj = nn.Linear(C, (self.H + 2 * self.K) * self.D, bias=qkv_bias)
        self.o_proj = nn.Linear(self.H * self.D, C, bias=cfg.bias)
        self.o_proj.residual = True  # scaled at init (GPT-2)
        self.qk_norm = cfg.qk_norm and not cross
        if self.qk_norm:  # one (D,) weight shared by all heads, as Qwen3's q_norm / k_norm
            self.q_norm, self.k_norm = RMSNorm(self.D, cfg.norm_eps), RMSNorm(self.D, cfg.norm_eps)
        self.attn_dropout = cfg.attn_dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def project_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys and values of the encoder output (B, S, C) -> 2 x (B, K, S, D)."""
        B, S, _ = memory.shape
        k, v = self.kv_proj(memory).view(B, S, 2, self.K, self.D).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(
        self,
        x: torch.Tensor,  # (B, T, C)
        mask: torch.Tensor | None,  # (B, 1, T, S) bool (True = may attend) or additive float; None = causal
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
        memory_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        causal: bool = True,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        if self.cross:
            q = self.q_proj(x).view(B, T, self.H, self.D).transpose(1, 2)  # (B, H, T, D)
            k, v = memory_kv
        else:
            qkv = self.qkv_proj(x).view(B, T, self.H + 2 * self.K, self.D).transpose(1, 2)
            q, k, v = qkv.split([self.H, self.K, self.K], dim=1)  # (B, H, T, D), (B, K, T, D) x 2
            if self.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            if cache is not None:
                k, v = cache.update(layer, k, v)  # (B, K, S, D) with S = everything cached so far
        y = attention(q, k, v, mask, self.attn_dropout if self.training else 0.0,
                      is_causal=mask is None and causal and not self.cross, gqa=self.K != self.H)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, self.H * self.D)  # (B, T, C)
        return self.resid_dropout(self.o_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        I = cfg.hidden_dim
        # SwiGLU keeps gate and up in one matmul: (C -> 2I), split into silu(gate) * up.
        self.fc = nn.Linear(cfg.n_embd, 2 * I if self.swiglu else I, bias=cfg.bias)
        self.proj = nn.Linear(I, cfg.n_embd, bias=cfg.bias)
        self.proj.residual = True
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return self.dropout(self.proj(h))


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)) [+ cross_attn(norm(x), memory)] + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, cross: bool = False):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = Attention(cfg)
        if cross:
            self.ln_cross = make_norm(cfg)
            self.cross_attn = Attention(cfg, cross=True)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, mask, rope=None, cache=None, layer=0, memory_kv=None, memory_mask=None,
                causal=True):
        x = x + self.attn(self.ln_1(x), mask, rope, cache, layer, causal=causal)
        if memory_kv is not None:
            x = x + self.cross_attn(self.ln_cross(x), memory_mask, memory_kv=memory_kv)
        return x + self.mlp(self.ln_2(x))


# ----------------------------------------------------------------------------------------------------
# Masks and positions


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that follow the attention mask (B, T): 0 at each row's first real token, so a
    left-padded row gets the same positions as the same row unpadded. Pad positions get 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def build_mask(
    attention_mask: torch.Tensor | None,  # (B, S) 1 = real key, 0 = padding (S = keys, cache included)
    T: int,  # number of queries: the last T of the S positions
    causal: bool = True,
    segment_ids: torch.Tensor | None = None,  # (B, S) packed documents: attend only within a segment
) -> torch.Tensor | None:
    """The boolean SDPA mask (B, 1, T, S), True = may attend; None when plain causal attention is exact.

    Every query may always attend to itself, so that rows of padding (which attend to no real key) stay
    finite instead of NaN; their outputs are never used."""
    if attention_mask is None and segment_ids is None:
        return None
    ref = attention_mask if attention_mask is not None else segment_ids
    B, S = ref.shape
    device = ref.device
    q_pos = torch.arange(S - T, S, device=device)  # absolute index of each query among the keys
    k_pos = torch.arange(S, device=device)
    mask = torch.ones(B, 1, T, S, dtype=torch.bool, device=device)
    if causal:
        mask = mask & (k_pos[None, :] <= q_pos[:, None])[None, None]
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, None, :]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, None, S - T:, None] == segment_ids[:, None, None, :])
    return mask | (k_pos[None, :] == q_pos[:, None])[None, None]


# ----------------------------------------------------------------------------------------------------
# The decoder-only trunk, the language model and the scalar model


def _check_ids(idx: torch.Tensor, cfg: ModelConfig, where: str) -> None:
    """A clear error for a sequence longer than the context or an id outside the vocabulary.

    The range check costs a reduction and, on the CPU, a host read; on CUDA it is an asynchronous device
    assert (no sync per training micro-step), and under torch.compile it is skipped so that the graph does
    not break (the embedding lookup still fails on ids past the table). Callers that validated their ids
    (the generation engine's decode steps) pass check_ids=False to the models."""
    T = idx.size(-1)
    if T > cfg.block_size:
        raise ValueError(f"{where}: sequence of {T} tokens exceeds the model's context of {cfg.block_size}")
    if idx.numel() == 0 or torch.compiler.is_compiling():
        return
    message = f"{where}: token ids must be in [0, {cfg.vocab_size})"
    if idx.is_cuda:
        torch._assert_async(((idx >= 0) & (idx < cfg.vocab_size)).all(), message)
        return
    lo, hi = (int(t) for t in idx.aminmax())
    if lo < 0 or hi >= cfg.vocab_size:
        raise ValueError(f"{message}; got min {lo}, max {hi}")


class Transformer(nn.Module):
    """Token (+ position) embeddings, a stack of blocks, a final norm: ids (B, T) -> hidden (B, T, C).
    With `cross=True` its blocks also attend to an encoder output (the seq2seq decoder)."""

    def __init__(self, cfg: ModelConfig, n_layer: int | None = None, cross: bool = False,
                 wte: nn.Embedding | None = None):
        super().__init__()
        self.cfg = cfg
        self.wte = wte if wte is not None else nn.Embedding(cfg.padded_vocab, cfg.n_embd)
        if cfg.position == "learned":
            self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        else:
            self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg, cross=cross) for _ in range(n_layer or cfg.n_layer))
        self.ln_f = make_norm(cfg)

    def rope(self, position_ids: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        angles = position_ids[:, None, :, None].float() * self.inv_freq  # (B, 1, T, D/2)
        angles = torch.cat((angles, angles), dim=-1)  # (B, 1, T, D)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(
        self,
        idx: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, S): keys, including the cache; or a 4-D mask
        position_ids: torch.Tensor | None = None,  # (B, T)
        segment_ids: torch.Tensor | None = None,  # (B, T) packed documents
        cache: KVCache | None = None,
        causal: bool = True,
        memory_kv: list | None = None,
        memory_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T = idx.shape
        # A 4-D attention mask (B, 1, T, S) is the SDPA mask itself, built by the caller (the generation
        # engine keeps one across decode steps); it needs explicit position ids.
        prebuilt = attention_mask is not None and attention_mask.dim() == 4
        if prebuilt and (position_ids is None or segment_ids is not None):
            raise ValueError("a 4-D attention mask needs position_ids and no segment_ids")
        if position_ids is None:
            if attention_mask is not None:
                position_ids = positions_from_mask(attention_mask)[:, -T:]
            else:
                start = cache.length if cache is not None else 0
                position_ids = torch.arange(start, start + T, device=idx.device).expand(B, T)
        x = self.wte(idx)  # (B, T, C)
        rope = None
        if self.cfg.position == "learned":
            x = x + self.wpe(position_ids)
        else:
            rope = self.rope(position_ids, x.dtype)
        x = self.drop(x)
        if cache is not None and attention_mask is None:
            raise ValueError("decoding with a KV cache needs the attention mask of every cached key")
        mask = attention_mask if prebuilt else build_mask(attention_mask, T, causal=causal, segment_ids=segment_ids)
        for i, block in enumerate(self.h):
            mkv = memory_kv[i] if memory_kv is not None else None
            x = block(x, mask, rope, cache, i, memory_kv=mkv, memory_mask=memory_mask, causal=causal)
        if cache is not None:
            cache.length += T
        return self.ln_f(x)


def init_weights(module: nn.Module, n_layer: int) -> None:
    """GPT-2 initialisation: N(0, 0.02), zero biases, residual projections scaled by 1/sqrt(2 n_layer)
    so the residual stream's variance does not grow with depth."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            std = 0.02 / math.sqrt(2 * n_layer) if getattr(m, "residual", False) else 0.02
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)


class GPT(nn.Module):
    """Decoder-only language model: ids (B, T) -> logits (B, T, V)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.arch != "gpt":
            raise ValueError(f"GPT needs arch='gpt', got {cfg.arch!r} (use Seq2Seq)")
        self.config = cfg
        self.transformer = Transformer(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab, bias=False)
        init_weights(self, cfg.n_layer)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def forward(self, idx, attention_mask=None, position_ids=None, segment_ids=None, cache=None,
                logits_slice: slice | None = None, *, check_ids: bool = True) -> torch.Tensor:
        """Logits (B, T, V) over the real vocabulary. `logits_slice` picks time steps before the
        unembedding (generation needs only the last one). `attention_mask` is (B, S) with 1 = real key,
        or a prebuilt 4-D SDPA mask (B, 1, T, S) together with position_ids. check_ids=False skips the
        id range check for callers that validated the ids."""
        if check_ids:
            _check_ids(idx, self.config, "GPT input")
        h = self.transformer(idx, attention_mask, position_ids, segment_ids, cache)
        if logits_slice is not None:
            h = h[:, logits_slice]
        return self.lm_head(h)[..., : self.config.vocab_size]

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.config.position == "learned":
            n -= self.transformer.wpe.weight.numel()
        return n


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index (B,) of each row's last real token, for left, right or no padding."""
    T = attention_mask.size(-1)
    return T - 1 - attention_mask.long().flip(-1).argmax(-1)


class ScalarModel(nn.Module):
    """The trunk with the unembedding replaced by one value per position (reward and value models).
    A sequence's score is the value at its last real token."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.arch != "gpt":
            raise ValueError("the scalar head needs a decoder-only model (arch='gpt')")
        self.config = cfg
        self.transformer = Transformer(cfg)
        self.score_head = nn.Linear(cfg.n_embd, 1, bias=True)
        init_weights(self, cfg.n_layer)
        nn.init.normal_(self.score_head.weight, std=1.0 / math.sqrt(cfg.n_embd + 1))

    def forward(self, idx, attention_mask=None, position_ids=None, segment_ids=None) -> torch.Tensor:
        """Values (B, T), one per position."""
        _check_ids(idx, self.config, "scalar model input")
        h = self.transformer(idx, attention_mask, position_ids, segment_ids)
        return self.score_head(h).squeeze(-1)

    def score(self, idx: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One score (B,) per sequence: the value at its last real token, whatever the padding side."""
        values = self(idx, attention_mask)
        return values.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)


# ----------------------------------------------------------------------------------------------------
# Encoder-decoder


class Seq2Seq(nn.Module):
    """Encoder-decoder: a bidirectional encoder over the source (with a padding mask), and a decoder with
    masked self-attention and cross-attention over the encoder output. One embedding table is shared by
    encoder, decoder and (when tied) the unembedding."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.arch != "seq2seq":
            raise ValueError(f"Seq2Seq needs arch='seq2seq', got {cfg.arch!r}")
        self.config = cfg
        self.encoder = Transformer(cfg, n_layer=cfg.n_encoder_layer or cfg.n_layer)
        self.decoder = Transformer(cfg, cross=True, wte=self.encoder.wte)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab, bias=False)
        init_weights(self, cfg.n_layer)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.encoder.wte.weight

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder output (B, S, C); padded source positions are masked out as keys."""
        _check_ids(src, self.config, "encoder input")
        return self.encoder(src, src_mask, causal=False)

    def memory_kv(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each decoder layer's cross-attention keys and values, computed once per source."""
        return [block.cross_attn.project_kv(memory) for block in self.decoder.h]

    def decode(self, tgt, memory_kv, src_mask=None, tgt_mask=None, position_ids=None, cache=None,
               logits_slice: slice | None = None, *, check_ids: bool = True) -> torch.Tensor:
        if check_ids:
            _check_ids(tgt, self.config, "decoder input")
        memory_mask = None
        if src_mask is not None:
            memory_mask = src_mask.bool()[:, None, None, :]  # (B, 1, 1, S): every query sees real sources
        h = self.decoder(tgt, tgt_mask, position_ids, cache=cache, memory_kv=memory_kv,
                         memory_mask=memory_mask)
        if logits_slice is not None:
            h = h[:, logits_slice]
        return self.lm_head(h)[..., : self.config.vocab_size]

    def forward(self, src, tgt, src_mask=None, tgt_mask=None) -> torch.Tensor:
        """Logits (B, T, V) for the decoder input `tgt` given the source `src`."""
        memory = self.encode(src, src_mask)
        return self.decode(tgt, self.memory_kv(memory), src_mask, tgt_mask)


def build_model(cfg: ModelConfig, scalar: bool = False) -> nn.Module:
    if cfg.arch == "seq2seq":
        if scalar:
            raise ValueError("reward and value models need a decoder-only model (arch='gpt')")
        return Seq2Seq(cfg)
    return ScalarModel(cfg) if scalar else GPT(cfg)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


__all__ = [
    "PRESETS", "GPT", "KVCache", "ModelConfig", "ScalarModel", "Seq2Seq", "Transformer", "build_model",
    "build_mask", "count_params", "last_token_index", "positions_from_mask",
]


def set_dropout(model: nn.Module, p: float, attn: float | None = None) -> None:
    """Residual dropout `p` in every nn.Dropout of the model and, when given, attention dropout `attn`; the
    config is left as it is (a stage decides what the exported model's config says)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        if attn is not None and hasattr(m, "attn_dropout") and isinstance(m.attn_dropout, float):
            m.attn_dropout = attn
