"""The superposition student: a small BitNet transformer, and the decompressor that maps its states up to the
teacher's width.

Pre-norm blocks (RMSNorm), causal self-attention through ``scaled_dot_product_attention`` with rotary position
embeddings and an optional padding mask, SwiGLU MLP; every projection inside the blocks is a ``BitLinear``.
Embeddings, norms and the LM head stay in full precision, as in BitNet b1.58.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .layers import BitLinear


@dataclass
class StudentConfig:
    """The superposition student's shape; ``vocab_size`` and ``max_seq_len`` come from whoever builds it (the
    pipeline: the teacher's vocabulary and ``data.seq_len``)."""

    # read by pydantic, which validates this class as the pipeline configuration's ``student`` section: a misspelt
    # key is an error there, not ignored (a plain dict: this package does not import pydantic)
    __pydantic_config__ = {"extra": "forbid"}

    vocab_size: int | None = None
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    mlp_hidden: int | None = None  # SwiGLU width; default 8/3 * dim rounded up to a multiple of 64
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    projector_hidden: int | None = None  # the decompressor's hidden width; default the teacher's width

    def __post_init__(self):
        for name in ("dim", "n_layers", "n_heads", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"student {name} must be positive, got {getattr(self, name)}")
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(
                f"student dim {self.dim} must be divisible by n_heads {self.n_heads} into an even head size "
                "(rotary embeddings rotate pairs of channels)"
            )
        if self.mlp_hidden is None:
            self.mlp_hidden = 64 * math.ceil(8 * self.dim / 3 / 64)

    def to_dict(self) -> dict:
        return asdict(self)


class StudentOutput(NamedTuple):
    logits: torch.Tensor | None
    last_hidden: torch.Tensor  # after the final norm: what the LM head and the decompressor read
    hidden_states: tuple[torch.Tensor, ...] | None  # embeddings + each block's output, when asked for


def rotary_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # [T, head_dim], rotate-half layout as in Llama
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def attention_mask_4d(attention_mask: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Boolean [B, 1, T, T]: causal, padded keys hidden. Each query always sees itself, so rows of padding
    never become all-masked (which would make SDPA return NaN)."""
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=attention_mask.device).tril()
    keys = attention_mask.bool()[:, None, None, :]
    eye = torch.eye(seq_len, dtype=torch.bool, device=attention_mask.device)
    return causal & (keys | eye)


class Attention(nn.Module):
    def __init__(self, cfg: StudentConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = BitLinear(cfg.dim, 3 * cfg.dim)
        self.out = BitLinear(cfg.dim, cfg.dim)

    def forward(self, x, cos, sin, mask):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, C // self.n_heads).transpose(1, 3).unbind(2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    def __init__(self, cfg: StudentConfig):
        super().__init__()
        self.gate = BitLinear(cfg.dim, cfg.mlp_hidden)
        self.up = BitLinear(cfg.dim, cfg.mlp_hidden)
        self.down = BitLinear(cfg.mlp_hidden, cfg.dim)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: StudentConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, cos, sin, mask):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask)
        return x + self.mlp(self.mlp_norm(x))


class SuperpositionStudent(nn.Module):
    def __init__(self, vocab_size: int, dim: int = 768, n_layers: int = 12, n_heads: int = 12, **kwargs):
        super().__init__()
        self.config = cfg = StudentConfig(vocab_size, dim, n_layers, n_heads, **kwargs)
        if not cfg.vocab_size or cfg.vocab_size < 1:
            raise ValueError(f"the student needs a positive vocab_size, got {cfg.vocab_size!r}")
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rotary_tables(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith(("attn.out.weight", "mlp.down.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers))
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def untie_lm_head(self) -> None:
        """Give the LM head its own copy of the weights, so retraining it leaves the embeddings alone."""
        if self.lm_head.weight is self.embed.weight:
            self.lm_head.weight = nn.Parameter(self.embed.weight.detach().clone())
            self.config.tie_embeddings = False

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        compute_logits: bool = True,
    ) -> StudentOutput:
        T = input_ids.shape[1]
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds the student's max_seq_len {self.config.max_seq_len}")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask_4d(attention_mask, T)
        x = self.embed(input_ids)
        states = [x] if output_hidden_states else None
        for block in self.blocks:
            x = block(x, cos, sin, mask)
            if states is not None:
                states.append(x)
        x = self.norm(x)
        logits = self.lm_head(x) if compute_logits else None
        return StudentOutput(logits, x, tuple(states) if states is not None else None)

    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None
    ) -> torch.Tensor:
        """Sample continuations (temperature 0 is greedy). No KV cache: fine for a quick look at samples."""
        for _ in range(max_new_tokens):
            context = input_ids[:, -self.config.max_seq_len:]
            logits = self(context).logits[:, -1, :].float()
            if temperature <= 0:
                next_id = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_id = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            input_ids = torch.cat([input_ids, next_id], dim=1)
        return input_ids


class Decompressor(nn.Module):
    """Up-projector from student width to teacher width: Linear -> GELU -> LayerNorm -> Linear."""

    def __init__(self, student_dim: int, teacher_dim: int, hidden_dim: int | None = None):
        super().__init__()
        hidden_dim = hidden_dim or teacher_dim
        self.config = {"student_dim": student_dim, "teacher_dim": teacher_dim, "hidden_dim": hidden_dim}
        self.net = nn.Sequential(
            nn.Linear(student_dim, hidden_dim), nn.GELU(), nn.LayerNorm(hidden_dim), nn.Linear(hidden_dim, teacher_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
