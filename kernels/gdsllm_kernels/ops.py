"""Launchers for the CUDA kernels: each checks dtypes, shapes and alignment (ValueError) before launching on
torch's current stream. Weights are GGML rows as stored (uint8 [rows, row_bytes]) or plain F32/F16/BF16 tensors."""

import numpy as np
import torch

from gdsllm_kernels import launch, ptr

QTYPE_CODES = {"F32": 0, "F16": 1, "BF16": 2, "Q4_0": 3, "Q4_1": 4, "Q5_0": 5, "Q5_1": 6, "Q8_0": 7,
               "Q2_K": 8, "Q3_K": 9, "Q4_K": 10, "Q5_K": 11, "Q6_K": 12, "Q4_0R": 13, "Q8_0R": 14,
               "IQ4_NL": 32, "IQ4_XS": 33, "IQ3_S": 34, "IQ3_XXS": 35, "IQ2_XXS": 36, "IQ2_XS": 37, "IQ2_S": 38,
               "IQ1_S": 39, "IQ1_M": 40, "MXFP4": 41}
# (values per block, bytes per block)
BLOCKS = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22),
          "Q5_1": (32, 24), "Q8_0": (32, 34), "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144),
          "Q5_K": (256, 176), "Q6_K": (256, 210), "Q4_0R": (32, 18), "Q8_0R": (32, 34),
          "IQ4_NL": (32, 18), "IQ4_XS": (256, 136), "IQ3_S": (256, 110), "IQ3_XXS": (256, 98), "IQ2_XXS": (256, 66),
          "IQ2_XS": (256, 74), "IQ2_S": (256, 82), "IQ1_S": (256, 50), "IQ1_M": (256, 56), "MXFP4": (32, 17)}
# GPU layouts of resident weights (see ggml_blocks.cuh): type -> its repacked type
REPACKED = {"Q4_0": "Q4_0R", "Q8_0": "Q8_0R"}
FAST_TYPES = ("Q4_0", "Q4_0R")  # may sum products in fp16 (opt-in, see gemv.cu)
PLAIN = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
MAX_BATCH = 16  # sequences per GEMV launch (the tensor-core kernel's most; callers may pass more)
SIMT_MAX_BATCH = 8  # sequences per launch of the SIMT kernel (gemv.cu)
GEMV_WARPS = 4
MMA_TYPES = ("Q4_0R", "Q8_0R")  # types gemv_mma.cu reads
MMA_WARPS = 8
ATTN_SPLITS = 32  # most position splits per (sequence, head) in decode attention
ATTN_BLOCKS = 1024  # attention blocks a decode step aims for (B x heads x splits)
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


def _check_x(x: torch.Tensor) -> tuple[int, int]:
    _check(x, "x", torch.float16)
    if x.dim() != 2 or not x.shape[0]:
        raise ValueError(f"x must be [B, K] with B >= 1, got {tuple(x.shape)}")
    return x.shape


def gemv(weights: list[torch.Tensor], qtype: str, x: torch.Tensor, outs: list[torch.Tensor],
         accumulate: bool = False, fast: bool = False, tensor_cores: bool | None = None) -> None:
    """outs[i][b] (=|+=) weights[i] @ x[b] for up to three matrices of one type and the same K in one launch
    (per group of rows of x the kernel takes). x: fp16 [B, K]; outs: fp32 [B, rows_i]. Products are summed in
    fp32; with `fast`, Q4_0 sums 8 at a time in fp16 first (a few % quicker; overflows when activations exceed
    about 1000).
    `tensor_cores` picks the MMA kernel for repacked types (None: wherever it applies, see `use_mma`)."""
    if not 1 <= len(weights) <= 3 or len(weights) != len(outs):
        raise ValueError("gemv takes one to three weights, each with its output")
    batch, cols = _check_x(x)
    counts = []
    for weight, out in zip(weights, outs, strict=True):
        rows, nbytes = _check_weight(weight, qtype, cols)
        _check(out, "out", torch.float32, (batch, rows))
        counts.append(rows)
    _launch_gemv(qtype, 1 if accumulate else 0, weights, counts, cols, nbytes, x, outs, None, fast, tensor_cores)


def gemv_swiglu(gate: torch.Tensor, up: torch.Tensor, qtype: str, x: torch.Tensor, out: torch.Tensor,
                fast: bool = False, tensor_cores: bool | None = None) -> None:
    """out[b] = fp16(silu(gate @ x[b]) * (up @ x[b])): the decode FFN's first half in one launch (per group of
    rows of x the kernel takes)."""
    batch, cols = _check_x(x)
    rows, nbytes = _check_weight(gate, qtype, cols)
    if _check_weight(up, qtype, cols)[0] != rows:
        raise ValueError(f"gate has {rows} rows but up has {up.shape[0]}")
    _check(out, "out", torch.float16, (batch, rows))
    _launch_gemv(qtype, 2, [gate, up], [rows, rows], cols, nbytes, x, [], out, fast, tensor_cores)


def use_mma(qtype: str, counts: list[int]) -> bool:
    """Whether the tensor-core kernel (gemv_mma.cu) can take this product: repacked Q4_0/Q8_0 with row counts of a
    multiple of 16. Where it can, it is the default: on the H100 it beat the SIMT kernel from one sequence up
    (1,669 vs 1,499 GB/s on a 11008 x 4096 Q4_0 matrix) and stays nearly flat to 8 (1,524 GB/s)."""
    return qtype in MMA_TYPES and all(n % 16 == 0 for n in counts)


def _launch_gemv(qtype, mode, weights, counts, cols, nbytes, x, outs, out_h, fast, tensor_cores) -> None:
    """Launch the chosen kernel over every row of x, in groups of as many rows as it takes (MAX_BATCH for the
    tensor-core kernel, SIMT_MAX_BATCH for the SIMT one)."""
    if tensor_cores is None:
        tensor_cores = use_mma(qtype, counts)
    elif tensor_cores and not use_mma(qtype, counts):
        raise ValueError(f"the tensor-core GEMV takes Q4_0R/Q8_0R matrices of a multiple of 16 rows, not {qtype} "
                         f"with {counts} rows")
    ws = [ptr(w) for w in weights] + [np.uint64(0)] * (3 - len(weights))
    ns = [np.int32(n) for n in counts] + [np.int32(0)] * (3 - len(counts))
    total = counts[0] if mode == 2 else sum(counts)
    step = MAX_BATCH if tensor_cores else SIMT_MAX_BATCH
    for first in range(0, x.shape[0], step):
        part = x[first:first + step]
        b = part.shape[0]
        ys = [ptr(o[first:first + b]) for o in outs] + [np.uint64(0)] * (3 - len(outs))
        out_part = ptr(None if out_h is None else out_h[first:first + b])
        if tensor_cores:
            launch("gemv_mma.cu", f"gemv_mma<{QTYPE_CODES[qtype]},{(b + 7) // 8},{mode}>", (total // 16,),
                   (MMA_WARPS * 32,), (*ws, *ns, np.int32(cols), np.int64(nbytes), ptr(part), np.int32(b), *ys,
                                       out_part))
            continue
        per_warp = _gemv_rows_per_warp(b, mode)
        rows_per_block = GEMV_WARPS * per_warp
        name = f"gemv<{QTYPE_CODES[qtype]},{b},{per_warp},{mode},{'true' if fast and qtype in FAST_TYPES else 'false'}>"
        launch("gemv.cu", name, ((total + rows_per_block - 1) // rows_per_block,), (GEMV_WARPS * 32,),
               (*ws, *ns, np.int32(cols), np.int64(nbytes), ptr(part), *ys, out_part))


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


SEQ_SLOT_FIELDS = 5  # int64 per sequence in the decode table: pos, len, k address, v address, layer stride


def seq_slots(k_caches: list[torch.Tensor], v_caches: list[torch.Tensor], positions: list[int],
              lengths: list[int]) -> torch.Tensor:
    """The table the RoPE and attention kernels read (kernels/seq_slots.cuh), on the host: int64 [B, 5], one row
    per sequence with its position, attended length and caches (fp16 [n_layers, max_T, n_kv, hd], or one layer
    [max_T, n_kv, hd]). Copy it into a device buffer before launching; the kernels trust it, so it is checked here."""
    if not len(k_caches) == len(v_caches) == len(positions) == len(lengths):
        raise ValueError(f"{len(k_caches)} k caches, {len(v_caches)} v caches, {len(positions)} positions and "
                         f"{len(lengths)} lengths: one of each per sequence")
    rows = []
    for k_cache, v_cache, pos, length in zip(k_caches, v_caches, positions, lengths, strict=True):
        if k_cache.shape != v_cache.shape or k_cache.dim() not in (3, 4):
            raise ValueError(f"k and v caches must be [n_layers, max_T, n_kv, hd] alike, got "
                             f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
        _check(k_cache, "k_cache", torch.float16)
        _check(v_cache, "v_cache", torch.float16)
        max_tokens = k_cache.shape[-3]
        if not 0 <= pos < max_tokens or not 0 <= length <= max_tokens:
            raise ValueError(f"position {pos} / length {length} outside a cache of {max_tokens} tokens")
        stride = k_cache.stride(0) if k_cache.dim() == 4 else 0
        rows.append((pos, length, k_cache.data_ptr(), v_cache.data_ptr(), stride))
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, SEQ_SLOT_FIELDS)


def _check_slots(slots: torch.Tensor) -> int:
    """The number of sequences of a device table made by `seq_slots`."""
    _check(slots, "slots", torch.int64, align=8)
    if slots.dim() != 2 or slots.shape[1] != SEQ_SLOT_FIELDS or not slots.shape[0]:
        raise ValueError(f"slots must be int64 [B, {SEQ_SLOT_FIELDS}] (see seq_slots), got {tuple(slots.shape)}")
    return slots.shape[0]


def rope_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, layer: int,
               inv_freq: torch.Tensor, n_head: int, n_kv: int, head_dim: int, rot_dim: int, neox: bool,
               q_out: torch.Tensor) -> None:
    """For B sequences (slots: their device table, see `seq_slots`) of T new tokens each: rotate q into q_out
    (fp16) and k into layer `layer` of each sequence's k cache, copy v into its v cache, token t of sequence b at
    position pos[b] + t. q fp32 [B*T, n_head*hd]; k, v fp32 [B*T, n_kv*hd]; rows sequence-major."""
    if head_dim % 2 or rot_dim % 2 or rot_dim > head_dim or n_kv <= 0 or n_head % n_kv:
        raise ValueError(f"bad attention geometry: heads {n_head}/{n_kv}, head_dim {head_dim}, rot {rot_dim}")
    batch = _check_slots(slots)
    rows = q.shape[0]
    if rows % batch:
        raise ValueError(f"{rows} rows of q do not split evenly over {batch} sequences")
    _check(q, "q", torch.float32, (rows, n_head * head_dim), align=4)
    _check(k, "k", torch.float32, (rows, n_kv * head_dim), align=4)
    _check(v, "v", torch.float32, (rows, n_kv * head_dim), align=4)
    _check(inv_freq, "inv_freq", torch.float32, (rot_dim // 2,), align=4)
    _check(q_out, "q_out", torch.float16, (rows, n_head * head_dim), align=2)
    if rows:
        launch("rope.cu", "rope_store", (n_head + 2 * n_kv, rows // batch, batch), (head_dim // 2,),
               (ptr(q), ptr(k), ptr(v), ptr(slots), np.int32(layer), ptr(inv_freq), np.int32(n_head),
                np.int32(n_kv), np.int32(head_dim), np.int32(rot_dim), np.int32(1 if neox else 0), ptr(q_out)))


def attention_splits(n_head: int, batch: int) -> int:
    """Position splits per (sequence, head): enough blocks to fill the GPU, fewer as the batch grows."""
    return max(1, min(ATTN_SPLITS, -(-ATTN_BLOCKS // (n_head * batch))))


def attention_scratch(n_head: int, head_dim: int, device: torch.device,
                      max_batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The split partials attention_decode needs for up to `max_batch` sequences, allocated once per model."""
    parts = max(n_head * b * attention_splits(n_head, b) for b in range(1, max_batch + 1))
    return (torch.empty(parts * head_dim, dtype=torch.float32, device=device),
            torch.empty(parts * 2, dtype=torch.float32, device=device))


def attention_decode(q: torch.Tensor, slots: torch.Tensor, layer: int, n_kv: int, scale: float, out: torch.Tensor,
                     scratch: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Softmax attention of one new token per sequence, q fp16 [B, n_head, hd], over the first len[b] positions of
    layer `layer` of sequence b's caches (slots: the device table, see `seq_slots`); writes fp16 out [B, n_head, hd]."""
    if q.dim() != 3:
        raise ValueError(f"q must be [B, n_head, head_dim], got {tuple(q.shape)}")
    batch, n_head, head_dim = q.shape
    if head_dim not in ATTN_HEAD_DIMS:
        raise ValueError(f"decode attention supports head_dim {ATTN_HEAD_DIMS}, got {head_dim}")
    if n_kv <= 0 or n_head % n_kv:
        raise ValueError(f"{n_head} query heads do not share {n_kv} KV heads evenly")
    if _check_slots(slots) != batch:
        raise ValueError(f"q holds {batch} sequences but slots {slots.shape[0]}")
    _check(q, "q", torch.float16, align=2)
    _check(out, "out", torch.float16, tuple(q.shape), align=2)
    splits = attention_splits(n_head, batch)
    part_o, part_ml = scratch
    parts = batch * n_head * splits
    if part_o.numel() < parts * head_dim or part_ml.numel() < parts * 2:
        raise ValueError(f"attention scratch is too small for {batch} sequences: make it with attention_scratch()")
    launch("attention.cu", f"attn_partial<{head_dim}>", (n_head, splits, batch), (128,),
           (ptr(q), ptr(slots), np.int32(layer), np.int32(n_head), np.int32(n_kv), np.float32(scale),
            ptr(part_o), ptr(part_ml)))
    launch("attention.cu", f"attn_combine<{head_dim}>", (n_head, batch), (head_dim,),
           (ptr(part_o), ptr(part_ml), np.int32(splits), ptr(out)))
