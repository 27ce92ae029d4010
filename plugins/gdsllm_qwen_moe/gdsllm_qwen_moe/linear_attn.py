"""Gated DeltaNet (Qwen3.5's linear attention) in torch: a chunked form for prefill (a loop over chunks, never over
tokens) and the recurrent form for decode. States: conv [B, conv_dim, kernel-1], recurrent [B, Hv, Dk, Dv] (fp32)."""

import torch
import torch.nn.functional as F

from gdsllm_qwen_moe.config import QwenMoeConfig
from gdsllm_qwen_moe.weights import Weight, linear

CHUNK = 64


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def gated_rmsnorm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm(x) * weight * silu(gate), in fp32 (the weight is plain, not zero-centred)."""
    x32 = x.to(torch.float32)
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * normed.to(x.dtype)) * F.silu(gate.to(torch.float32))


def causal_conv(mixed: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv1d + SiLU over [B, C, T] continuing from `conv_state` [B, C, K-1]; returns
    (output [B, C, T], new state)."""
    kernel = weight.shape[-1]
    padded = torch.cat([conv_state.to(mixed.dtype), mixed], dim=-1)  # [B, C, K-1+T]
    out = F.conv1d(padded, weight.to(mixed.dtype).unsqueeze(1), groups=mixed.shape[1])
    return F.silu(out), padded[..., padded.shape[-1] - (kernel - 1):].clone()


def recurrent_step(q, k, v, g, beta, state):
    """One token per sequence. q,k [B, H, Dk], v [B, H, Dv], g/beta [B, H], state [B, H, Dk, Dv] (fp32)."""
    state = state * g.exp()[..., None, None]
    predicted = (state * k.unsqueeze(-1)).sum(dim=-2)  # [B, H, Dv]
    delta = (v - predicted) * beta.unsqueeze(-1)
    state = state + k.unsqueeze(-1) * delta.unsqueeze(-2)
    return (state * q.unsqueeze(-1)).sum(dim=-2), state


def chunked(q, k, v, g, beta, state, chunk: int = CHUNK):
    """All tokens at once. q,k [B, H, T, Dk], v [B, H, T, Dv], g/beta [B, H, T], state [B, H, Dk, Dv] (fp32).
    Within a chunk the delta-rule updates are solved as one triangular system (the UT transform); chunks are
    scanned in order, carrying the state."""
    batch, heads, length, _ = k.shape
    pad = (chunk - length % chunk) % chunk
    q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    g, beta = (F.pad(t, (0, pad)) for t in (g, beta))
    n_chunks = (length + pad) // chunk
    k_beta = k * beta.unsqueeze(-1)
    v_beta = v * beta.unsqueeze(-1)
    q, k, k_beta, v_beta = (t.reshape(batch, heads, n_chunks, chunk, t.shape[-1]) for t in (q, k, k_beta, v_beta))
    g = g.reshape(batch, heads, n_chunks, chunk).cumsum(dim=-1)  # log of the decay since the chunk's start
    upper = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)
    decay = (g.unsqueeze(-1) - g.unsqueeze(-2)).masked_fill(upper, float("-inf")).exp()  # [.., i, j] = prod_{j<s<=i}
    system = (k_beta @ k.transpose(-1, -2)) * decay
    intra = (q @ k.transpose(-1, -2)) * decay
    values = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)
    keys_read = torch.linalg.solve_triangular(system, k_beta * g.exp().unsqueeze(-1), upper=False, unitriangular=True)
    q_decayed = q * g.exp().unsqueeze(-1)
    k_to_end = k * (g[..., -1:] - g).exp().unsqueeze(-1)
    chunk_decay = g[..., -1].exp()[..., None, None]
    out = torch.empty_like(values)
    for i in range(n_chunks):
        corrected = values[:, :, i] - keys_read[:, :, i] @ state
        out[:, :, i] = q_decayed[:, :, i] @ state + intra[:, :, i] @ corrected
        state = state * chunk_decay[:, :, i] + k_to_end[:, :, i].transpose(-1, -2) @ corrected
    return out.reshape(batch, heads, -1, v.shape[-1])[:, :, :length], state


def gated_deltanet(x: torch.Tensor, w: dict[str, Weight], prefix: str, config: QwenMoeConfig,
                   conv_state: torch.Tensor, recurrent_state: torch.Tensor):
    """x [B, T, hidden] -> (out [B, T, hidden], conv_state, recurrent_state)."""
    batch, length, _ = x.shape
    n_k, n_v = config.linear_num_key_heads, config.linear_num_value_heads
    d_k, d_v = config.linear_key_head_dim, config.linear_value_head_dim
    mixed = linear(x, w[prefix + "attn_qkv.weight"]).transpose(1, 2)  # [B, conv_dim, T]
    z = linear(x, w[prefix + "attn_gate.weight"]).reshape(batch, length, n_v, d_v)
    beta = torch.sigmoid(linear(x, w[prefix + "ssm_beta.weight"]))  # [B, T, Hv]
    a = linear(x, w[prefix + "ssm_alpha.weight"])
    g = -w[prefix + "ssm_a_log"].float().exp() * F.softplus(a.float() + w[prefix + "ssm_dt_bias"])
    mixed, conv_state = causal_conv(mixed, conv_state, w[prefix + "ssm_conv1d.weight"])
    q, k, v = torch.split(mixed.transpose(1, 2), [config.key_dim, config.key_dim, config.value_dim], dim=-1)
    q = q.reshape(batch, length, n_k, d_k).float()
    k = k.reshape(batch, length, n_k, d_k).float()
    v = v.reshape(batch, length, n_v, d_v).float()
    q, k = l2norm(q), l2norm(k)
    if n_v != n_k and config.linear_value_heads_tiled:  # value head j is served by q/k head j % n_k
        q, k = (t.repeat(1, 1, n_v // n_k, 1) for t in (q, k))
    elif n_v != n_k:  # each q/k head serves n_v / n_k consecutive value heads
        q, k = (t.repeat_interleave(n_v // n_k, dim=2) for t in (q, k))
    q = q * d_k ** -0.5
    if length == 1:
        core, recurrent_state = recurrent_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0].float(),
                                               recurrent_state.float())
        core = core.unsqueeze(1)  # [B, 1, Hv, Dv]
    else:
        core, recurrent_state = chunked(*(t.transpose(1, 2) for t in (q, k, v, g, beta.float())),
                                        state=recurrent_state.float())
        core = core.transpose(1, 2)  # [B, T, Hv, Dv]
    normed = gated_rmsnorm(core.to(x.dtype), z, w[prefix + "ssm_norm.weight"], config.rms_norm_eps)
    out = linear(normed.to(x.dtype).reshape(batch, length, -1), w[prefix + "ssm_out.weight"])
    return out, conv_state, recurrent_state
