"""Launchers for the CUDA kernels: each checks dtypes, shapes and alignment (ValueError) before launching on
torch's current stream. Weights are GGML rows as stored (uint8 [rows, row_bytes]) or plain F32/F16/BF16 tensors."""

import numpy as np
import torch

from gdsllm_core.kernels import launch, ptr

QTYPE_CODES = {"F32": 0, "F16": 1, "BF16": 2, "Q4_0": 3, "Q4_1": 4, "Q5_0": 5, "Q5_1": 6, "Q8_0": 7,
               "Q2_K": 8, "Q3_K": 9, "Q4_K": 10, "Q5_K": 11, "Q6_K": 12, "Q4_0R": 13, "Q8_0R": 14}
# (values per block, bytes per block)
BLOCKS = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22),
          "Q5_1": (32, 24), "Q8_0": (32, 34), "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144),
          "Q5_K": (256, 176), "Q6_K": (256, 210), "Q4_0R": (32, 18), "Q8_0R": (32, 34)}
# GPU layouts of resident weights (see ggml_blocks.cuh): type -> its repacked type
REPACKED = {"Q4_0": "Q4_0R", "Q8_0": "Q8_0R"}
FAST_TYPES = ("Q4_0", "Q4_0R")  # may sum products in fp16 (opt-in, see gemv.cu)
PLAIN = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
MAX_BATCH = 8
GEMV_WARPS = 4
ATTN_SPLITS = 32
ATTN_HEAD_DIMS = (64, 128, 256)


def row_bytes(qtype: str, cols: int) -> int:
    values, nbytes = BLOCKS[qtype]
    return cols // values * nbytes


def _check_weight(weight: torch.Tensor, qtype: str, cols: int) -> tuple[int, int]:
    """(rows, bytes per row) of a weight, after checking it can be read by the kernels."""
    if qtype not in QTYPE_CODES:
        raise ValueError(f"no GPU kernel for tensor type {qtype!r} (supported: {', '.join(QTYPE_CODES)})")
    values, _ = BLOCKS[qtype]
    if cols % max(values, 32):
        raise ValueError(f"{qtype} rows of {cols} values: the kernels need a multiple of {max(values, 32)}")
    if not weight.is_cuda:
        raise ValueError("weight must be on the GPU")
    expected = PLAIN.get(qtype, torch.uint8)
    if weight.dtype != expected:
        raise ValueError(f"a {qtype} weight must be {expected}, got {weight.dtype}")
    nbytes = row_bytes(qtype, cols)
    rows = weight.shape[0]
    if weight.dim() != 2 or weight.stride(1) != 1 or weight.stride(0) * weight.element_size() != nbytes:
        raise ValueError(f"{qtype} weight must be contiguous rows of {nbytes} bytes, got shape {tuple(weight.shape)}")
    if weight.data_ptr() % 16:
        raise ValueError("weight must start on a 16-byte boundary")
    if qtype in REPACKED.values() and nbytes % 16:
        raise ValueError(f"{qtype} rows must be a multiple of 16 bytes, got {nbytes}")
    return rows, nbytes


def can_repack(qtype: str, cols: int) -> bool:
    """Whether `repack` applies: Q4_0/Q8_0 rows of a multiple of 8 blocks (so codes stay 16-byte aligned)."""
    return qtype in REPACKED and cols % 256 == 0


def repack(weight: torch.Tensor, qtype: str, cols: int, scratch: torch.Tensor) -> str:
    """Rewrite a resident Q4_0/Q8_0 weight in place into the GPU layout (codes, then scales, per row) through
    `scratch` (uint8, at least the weight's size); returns the new type name for the kernels."""
    if not can_repack(qtype, cols):
        raise ValueError(f"cannot repack {qtype} rows of {cols} values (needs Q4_0/Q8_0 and a multiple of 256)")
    rows, nbytes = _check_weight(weight, qtype, cols)
    total = rows * nbytes
    if scratch.dtype != torch.uint8 or not scratch.is_cuda or scratch.numel() < total:
        raise ValueError(f"repack scratch must be a CUDA uint8 tensor of at least {total} bytes")
    copy = scratch[:total]
    copy.copy_(weight.reshape(-1))
    blocks = rows * (cols // 32)
    launch("repack.cu", f"repack<{QTYPE_CODES[qtype]}>", ((blocks + 255) // 256,), (256,),
           (ptr(copy), ptr(weight), np.int32(cols // 32), np.int64(blocks)))
    return REPACKED[qtype]


def _check(tensor: torch.Tensor, name: str, dtype: torch.dtype, shape: tuple[int, ...] | None = None,
           align: int = 16) -> None:
    """A contiguous CUDA tensor of `dtype` (and `shape`) starting on an `align`-byte boundary (16 where the kernel
    reads it with vector loads)."""
    if not tensor.is_cuda or tensor.dtype != dtype or not tensor.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {dtype} CUDA tensor, got {tensor.dtype} on {tensor.device}")
    if shape is not None and tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")
    if tensor.data_ptr() % align:
        raise ValueError(f"{name} must start on a {align}-byte boundary")


def dequantize(weight: torch.Tensor, qtype: str, cols: int, out: torch.Tensor | None = None,
               rows: torch.Tensor | None = None, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Rows of a weight as fp16 or fp32 [n, cols]; `rows` (int64, on the GPU) picks rows (an embedding lookup)."""
    n_rows, nbytes = _check_weight(weight, qtype, cols)
    if dtype not in (torch.float16, torch.float32):
        raise ValueError(f"dequantize writes float16 or float32, not {dtype}")
    if rows is not None:
        _check(rows, "rows", torch.int64, align=8)
        n_rows = rows.numel()
    if out is None:
        out = torch.empty(n_rows, cols, dtype=dtype, device=weight.device)
    _check(out, "out", dtype, (n_rows, cols))
    chunks = cols // 32
    total = n_rows * chunks
    if total:
        name = f"dequant<{QTYPE_CODES[qtype]},{0 if dtype == torch.float16 else 1}>"
        launch("dequant.cu", name, ((total + 255) // 256,), (256,),
               (ptr(weight), np.int64(nbytes), np.int32(chunks), np.int64(total), ptr(rows), ptr(out)))
    return out


def _gemv_rows_per_warp(batch: int, mode: int) -> int:
    return 2 if batch > 2 and mode != 2 else 1


def gemv(weights: list[torch.Tensor], qtype: str, x: torch.Tensor, outs: list[torch.Tensor],
         accumulate: bool = False, fast: bool = False) -> None:
    """outs[i][b] (=|+=) weights[i] @ x[b] for up to three matrices of one type and the same K in one launch.
    x: fp16 [B, K], B <= 8; outs: fp32 [B, rows_i]. Products are summed in fp32; with `fast`, Q4_0 sums 8 at a
    time in fp16 first (a few % quicker; overflows when activations exceed about 1000)."""
    if not 1 <= len(weights) <= 3 or len(weights) != len(outs):
        raise ValueError("gemv takes one to three weights, each with its output")
    _check(x, "x", torch.float16)
    if x.dim() != 2 or not 1 <= x.shape[0] <= MAX_BATCH:
        raise ValueError(f"x must be [B, K] with 1 <= B <= {MAX_BATCH}, got {tuple(x.shape)}")
    batch, cols = x.shape
    counts = []
    for weight, out in zip(weights, outs, strict=True):
        rows, nbytes = _check_weight(weight, qtype, cols)
        _check(out, "out", torch.float32, (batch, rows))
        counts.append(rows)
    mode = 1 if accumulate else 0
    _launch_gemv(qtype, batch, mode, weights, counts, cols, nbytes, x, outs, None, fast)


def gemv_swiglu(gate: torch.Tensor, up: torch.Tensor, qtype: str, x: torch.Tensor, out: torch.Tensor,
                fast: bool = False) -> None:
    """out[b] = fp16(silu(gate @ x[b]) * (up @ x[b])): the decode FFN's first half in one launch."""
    _check(x, "x", torch.float16)
    if x.dim() != 2 or not 1 <= x.shape[0] <= MAX_BATCH:
        raise ValueError(f"x must be [B, K] with 1 <= B <= {MAX_BATCH}, got {tuple(x.shape)}")
    batch, cols = x.shape
    rows, nbytes = _check_weight(gate, qtype, cols)
    if _check_weight(up, qtype, cols)[0] != rows:
        raise ValueError(f"gate has {rows} rows but up has {up.shape[0]}")
    _check(out, "out", torch.float16, (batch, rows))
    _launch_gemv(qtype, batch, 2, [gate, up], [rows, rows], cols, nbytes, x, [], out, fast)


def _launch_gemv(qtype, batch, mode, weights, counts, cols, nbytes, x, outs, out_h, fast) -> None:
    per_warp = _gemv_rows_per_warp(batch, mode)
    ws = [ptr(w) for w in weights] + [np.uint64(0)] * (3 - len(weights))
    ns = [np.int32(n) for n in counts] + [np.int32(0)] * (3 - len(counts))
    ys = [ptr(o) for o in outs] + [np.uint64(0)] * (3 - len(outs))
    total = counts[0] if mode == 2 else sum(counts)
    rows_per_block = GEMV_WARPS * per_warp
    fast = fast and qtype in FAST_TYPES
    name = f"gemv<{QTYPE_CODES[qtype]},{batch},{per_warp},{mode},{'true' if fast else 'false'}>"
    launch("gemv.cu", name, ((total + rows_per_block - 1) // rows_per_block,), (GEMV_WARPS * 32,),
           (*ws, *ns, np.int32(cols), np.int64(nbytes), ptr(x), *ys, ptr(out_h)))


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """fp16 RMSNorm of fp32 rows x [T, d] with an fp32 weight [d]."""
    _check(x, "x", torch.float32, align=4)
    if x.dim() != 2:
        raise ValueError(f"x must be [T, d], got {tuple(x.shape)}")
    rows, d = x.shape
    _check(weight, "weight", torch.float32, (d,), align=4)
    if out is None:
        out = torch.empty(rows, d, dtype=torch.float16, device=x.device)
    _check(out, "out", torch.float16, (rows, d), align=2)
    threads = min(1024, max(32, (d // 4 + 31) // 32 * 32))
    if rows:
        launch("rmsnorm.cu", "rmsnorm_f32", (rows,), (threads,), (ptr(x), ptr(weight), ptr(out), np.int32(d),
                                                                  np.float32(eps)))
    return out


def swiglu(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """fp16 silu(gate) * up, elementwise."""
    _check(gate, "gate", torch.float16)
    _check(up, "up", torch.float16, tuple(gate.shape))
    if out is None:
        out = torch.empty_like(gate)
    _check(out, "out", torch.float16, tuple(gate.shape))
    n = gate.numel()
    if n:
        launch("swiglu.cu", "swiglu_f16", ((n + 255) // 256,), (256,), (ptr(gate), ptr(up), ptr(out), np.int64(n)))
    return out


def rope_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos0: torch.Tensor, inv_freq: torch.Tensor,
               n_head: int, n_kv: int, head_dim: int, rot_dim: int, neox: bool, q_out: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """Rotate q into q_out (fp16) and k into k_cache, copy v into v_cache, for T tokens at positions pos0[0] + t.
    q fp32 [T, n_head*hd]; k, v fp32 [T, n_kv*hd]; pos0 int32 [1] on the GPU; caches fp16 [max_T, n_kv, hd]."""
    if head_dim % 2 or rot_dim % 2 or rot_dim > head_dim or n_kv <= 0 or n_head % n_kv:
        raise ValueError(f"bad attention geometry: heads {n_head}/{n_kv}, head_dim {head_dim}, rot {rot_dim}")
    tokens = q.shape[0]
    _check(q, "q", torch.float32, (tokens, n_head * head_dim), align=4)
    _check(k, "k", torch.float32, (tokens, n_kv * head_dim), align=4)
    _check(v, "v", torch.float32, (tokens, n_kv * head_dim), align=4)
    _check(pos0, "pos0", torch.int32, (1,), align=4)
    _check(inv_freq, "inv_freq", torch.float32, (rot_dim // 2,), align=4)
    _check(q_out, "q_out", torch.float16, (tokens, n_head * head_dim), align=2)
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check(cache, name, torch.float16, align=2)
        if cache.dim() != 3 or tuple(cache.shape[1:]) != (n_kv, head_dim):
            raise ValueError(f"{name} must be [max_T, {n_kv}, {head_dim}], got {tuple(cache.shape)}")
    if tokens:
        launch("rope.cu", "rope_store", (n_head + 2 * n_kv, tokens), (head_dim // 2,),
               (ptr(q), ptr(k), ptr(v), ptr(pos0), ptr(inv_freq), np.int32(n_head), np.int32(n_kv),
                np.int32(head_dim), np.int32(rot_dim), np.int32(1 if neox else 0), ptr(q_out), ptr(k_cache),
                ptr(v_cache)))


def attention_scratch(n_head: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The split partials attention_decode needs, allocated once per model."""
    return (torch.empty(n_head * ATTN_SPLITS * head_dim, dtype=torch.float32, device=device),
            torch.empty(n_head * ATTN_SPLITS * 2, dtype=torch.float32, device=device))


def attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, length: torch.Tensor,
                     scale: float, out: torch.Tensor, scratch: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Softmax attention of one token's q fp16 [n_head, hd] over the first length[0] cached positions
    (caches fp16 [max_T, n_kv, hd]); writes fp16 out [n_head, hd]."""
    if q.dim() != 2:
        raise ValueError(f"q must be [n_head, head_dim], got {tuple(q.shape)}")
    n_head, head_dim = q.shape
    if head_dim not in ATTN_HEAD_DIMS:
        raise ValueError(f"decode attention supports head_dim {ATTN_HEAD_DIMS}, got {head_dim}")
    _check(q, "q", torch.float16, align=2)
    _check(out, "out", torch.float16, (n_head, head_dim), align=2)
    _check(length, "length", torch.int32, (1,), align=4)
    n_kv = k_cache.shape[1] if k_cache.dim() == 3 else 0
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check(cache, name, torch.float16, align=2)
        if cache.dim() != 3 or cache.shape[2] != head_dim or cache.shape[1] != n_kv:
            raise ValueError(f"{name} must be [max_T, n_kv, {head_dim}], got {tuple(cache.shape)}")
    if n_kv == 0 or n_head % n_kv:
        raise ValueError(f"{n_head} query heads do not share {n_kv} KV heads evenly")
    part_o, part_ml = scratch
    if part_o.numel() < n_head * ATTN_SPLITS * head_dim or part_ml.numel() < n_head * ATTN_SPLITS * 2:
        raise ValueError("attention scratch is too small: make it with attention_scratch()")
    launch("attention.cu", f"attn_partial<{head_dim}>", (n_head, ATTN_SPLITS), (128,),
           (ptr(q), ptr(k_cache), ptr(v_cache), ptr(length), np.int32(n_head), np.int32(n_kv), np.float32(scale),
            ptr(part_o), ptr(part_ml)))
    launch("attention.cu", f"attn_combine<{head_dim}>", (n_head,), (head_dim,),
           (ptr(part_o), ptr(part_ml), np.int32(ATTN_SPLITS), ptr(out)))
