"""Attention benchmark: block-table sparsity, XLA dense vs chunked, and (on a GPU) the kernel matrix.

  python -m benchmarks.attention                 # CPU part -> benchmarks/results/attention_cpu.json
  python -m benchmarks.attention --smoke         # tiny run of every code path (CI-sized)

On CPU, Pallas interpret-mode timings mean nothing, so the CPU part measures what CPU can show:
  1. the block table on realistic packed rows (text + any-res images, 30-50 % image tokens; causal text;
     packed text documents) at L = 2K..16K: fractions of empty / partial / full tiles for the TPU (512 x 512)
     and Triton (128 x 64) blocks, mask density, and executed / useful FLOPs (what block skipping leaves
     over);
  2. dense XLA (the "xla" backend's closed-form backward, and autodiff through the same dense form) vs
     chunked attention: wall time and peak temporary memory (XLA's memory analysis), fwd, bwd and fwd+bwd,
     at the demo's shape and at several L; `closed_form_speedup` is the autodiff / closed-form ratio.
With a GPU present it also runs the GPU matrix: pallas vs cudnn vs xla vs chunked, fwd / bwd / fwd+bwd,
L in {2K, 4K, 8K, 16K}, D in {64, 128}, masks causal / hybrid / packed, reporting useful TFLOP/s
(4 * B * H * D * allowed pairs, x2.5 for bwd; pallas.md §3) and executed TFLOP/s (non-empty tiles), to
benchmarks/results/attention_gpu.json. The cuDNN causal baseline uses `is_causal=True` (no dense mask).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from tuna2_jax.kernels import block_table, dispatch, flash, xla_attention
from tuna2_jax.kernels.block_sizes import default_block_sizes

RESULTS = Path(__file__).parent / "results"
IMAGE_SIDES = ((32, 32), (28, 36), (24, 42), (36, 28), (42, 24), (16, 16))   # ~1K-token buckets + a small one


# ------------------------------------------------------------------------------------------------ layouts
def make_row(kind: str, length: int, rng: np.random.Generator, image_frac: float = 0.4):
  """(segment_ids, attn_end) of one row: "causal" (one text doc), "packed" (text docs), "hybrid" (docs of text
  and images, span = BOI TIME patches EOI, about `image_frac` image tokens)."""
  seg = np.zeros(length, np.int32)
  end = np.arange(length, dtype=np.int32)
  if kind == "causal":
    seg[:] = 1
    return seg, end
  cur, doc = 0, 0
  while cur < length:
    doc += 1
    doc_len = int(rng.integers(length // 8, length // 2)) if kind == "packed" else int(
        rng.integers(length // 4, length))
    stop = min(length, cur + doc_len)
    seg[cur:stop] = doc
    p = cur
    while p < stop:
      # An image (~1K tokens) per text run (~330) with probability 0.5 * image_frac: ~40 % image tokens.
      if kind == "hybrid" and rng.random() < image_frac * 0.5:
        h, w = IMAGE_SIDES[int(rng.integers(len(IMAGE_SIDES)))]
        span = min(h * w + 1, stop - p - 2)      # TIME + patches, between BOI and EOI
        if span > 0:
          end[p + 1:p + 1 + span] = p + span
          p += span + 2
          continue
      p += int(rng.integers(64, 600))
    cur = stop
  return seg, end


def density(seg: np.ndarray, end: np.ndarray) -> float:
  """Allowed pairs / L^2 in O(L): row q sees [seg_start, attn_end] of its (contiguous) segment."""
  stats = block_table.token_stats(jnp.asarray(seg)[None], jnp.asarray(end)[None])
  start = np.asarray(stats.seg_start[0])
  count = np.where(seg != 0, end - start + 1, 0)
  return float(count.sum()) / len(seg) ** 2


def sparsity(lengths, rows: int = 4, seed: int = 0) -> list[dict]:
  rng = np.random.default_rng(seed)
  out = []
  for length in lengths:
    for kind in ("causal", "packed", "hybrid"):
      layouts = [make_row(kind, length, rng) for _ in range(rows)]
      seg = jnp.asarray(np.stack([s for s, _ in layouts]))
      end = jnp.asarray(np.stack([e for _, e in layouts]))
      image_tokens = float(np.mean([(e > np.arange(length)).sum() / length for _, e in layouts]))
      dens = float(np.mean([density(s, e) for s, e in layouts]))
      for backend in ("mosaic_tpu", "triton"):
        sizes = default_block_sizes(backend, length, device_kind="TPU v5 lite")
        kind_tab = block_table.block_kinds(block_table.token_stats(seg, end), sizes.block_q, sizes.block_k)
        frac = block_table.executed_fraction(kind_tab)
        executed = 1.0 - frac["empty"]
        out.append(dict(L=length, mask=kind, backend=backend, block_q=sizes.block_q, block_k=sizes.block_k,
                        image_token_frac=round(image_tokens, 3), density=round(dens, 4),
                        empty=round(frac["empty"], 4), partial=round(frac["partial"], 4),
                        full=round(frac["full"], 4), executed_over_useful=round(executed / dens, 3)))
  return out


# ------------------------------------------------------------------------------------------------ timing
def _inputs(b, length, hq, hkv, d, dtype, kind, seed=0):
  rng = np.random.default_rng(seed)
  layouts = [make_row(kind, length, rng) for _ in range(b)]
  seg = jnp.asarray(np.stack([s for s, _ in layouts]))
  end = jnp.asarray(np.stack([e for _, e in layouts]))
  keys = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(keys[0], (b, length, hq, d), dtype)
  k = jax.random.normal(keys[1], (b, length, hkv, d), dtype)
  v = jax.random.normal(keys[2], (b, length, hkv, d), dtype)
  return q, k, v, seg, end


def _attn_fn(impl: str, causal_baseline: bool):
  if impl == "xla":
    return lambda q, k, v, s, e: xla_attention.dense_attention_fast(q, k, v, s, e)
  if impl == "xla_autodiff":
    return lambda q, k, v, s, e: xla_attention.dense_attention(q, k, v, s, e)
  if impl == "chunked":
    return lambda q, k, v, s, e: xla_attention.chunked_attention(q, k, v, s, e)
  if impl == "pallas":
    return lambda q, k, v, s, e: flash.hybrid_attention(q, k, v, s, e)
  if impl == "cudnn":
    if causal_baseline:
      return lambda q, k, v, s, e: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                implementation="cudnn")
    return lambda q, k, v, s, e: dispatch.cudnn_attention(q, k, v, s, e)
  raise ValueError(impl)


def _time(fn, args, iters: int) -> float:
  jax.block_until_ready(fn(*args))          # compile + warm-up
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def _peak_bytes(fn, args) -> int | None:
  try:
    mem = fn.lower(*args).compile().memory_analysis()
    return int(mem.temp_size_in_bytes + mem.output_size_in_bytes)
  except Exception:  # noqa: BLE001 - not every backend reports memory
    return None


def time_impl(impl: str, q, k, v, seg, end, *, mode: str, iters: int, causal_baseline: bool = False) -> dict:
  """mode "fwd": the attention call; "bwd": the VJP alone (residuals precomputed); "fwd+bwd": jit(grad)."""
  attn = _attn_fn(impl, causal_baseline)
  if mode == "fwd":
    fn, args = jax.jit(attn), (q, k, v, seg, end)
  elif mode == "bwd":
    out, vjp = jax.vjp(lambda q, k, v: attn(q, k, v, seg, end), q, k, v)
    # The VJP closure is a pytree: pass it as an argument so its residuals are inputs, not constants.
    fn, args = jax.jit(lambda f, do: f(do)), (vjp, jnp.ones_like(out))
  else:
    loss = lambda q, k, v, seg, end: jnp.sum(attn(q, k, v, seg, end).astype(jnp.float32))
    fn, args = jax.jit(jax.grad(loss, argnums=(0, 1, 2))), (q, k, v, seg, end)
  return dict(seconds=_time(fn, args, iters), peak_bytes=_peak_bytes(fn, args))


def xla_vs_chunked(lengths, *, b=1, hq=8, hkv=2, d=64, iters=3) -> list[dict]:
  """The "xla" backend (closed-form backward), autodiff through the same dense form, and chunked."""
  out = []
  for length in lengths:
    q, k, v, seg, end = _inputs(b, length, hq, hkv, d, jnp.float32, "hybrid")
    for impl in ("xla", "xla_autodiff", "chunked"):
      for mode in ("fwd", "bwd", "fwd+bwd"):
        r = time_impl(impl, q, k, v, seg, end, mode=mode, iters=iters)
        out.append(dict(L=length, impl=impl, mode=mode, B=b, Hq=hq, Hkv=hkv, D=d, dtype="float32",
                        ms=round(r["seconds"] * 1e3, 2),
                        peak_MiB=None if r["peak_bytes"] is None else round(r["peak_bytes"] / 2**20, 1)))
  return out


def closed_form_speedup(rows: list[dict]) -> list[dict]:
  """Autodiff time / closed-form time of the dense backend, per shape and mode (> 1: closed form faster)."""
  fields = ("L", "B", "D", "mode")
  key = lambda r: tuple(r[f] for f in fields)
  autodiff = {key(r): r["ms"] for r in rows if r["impl"] == "xla_autodiff"}
  return [dict(zip(fields, key(r)), autodiff_over_closed_form=round(autodiff[key(r)] / r["ms"], 2))
          for r in rows if r["impl"] == "xla"]


# ------------------------------------------------------------------------------------------------ GPU matrix
def gpu_matrix(lengths, head_dims, impls, *, tokens_per_batch: int = 16384, hidden: int = 2048,
               iters: int = 10, dtype=jnp.bfloat16) -> list[dict]:
  """FA-paper-style settings: B * L = tokens_per_batch, H = hidden / D (pallas.md §3)."""
  out = []
  for d in head_dims:
    hq = max(1, hidden // d)
    for length in lengths:
      b = max(1, tokens_per_batch // length)
      for mask in ("causal", "hybrid", "packed"):
        q, k, v, seg, end = _inputs(b, length, hq, hq, d, dtype, mask)
        allowed = sum(density(np.asarray(seg[i]), np.asarray(end[i])) for i in range(b)) * length ** 2
        sizes = default_block_sizes("triton" if jax.default_backend() == "gpu" else "mosaic_tpu", length)
        kind = block_table.block_kinds(block_table.token_stats(seg, end), sizes.block_q, sizes.block_k)
        executed_pairs = float(jnp.sum(kind != block_table.EMPTY)) * sizes.block_q * sizes.block_k
        for impl in impls:
          baseline = impl == "cudnn" and mask == "causal"
          if impl == "xla" and length > 8192:
            continue                                   # dense logits do not fit
          if impl == "cudnn" and not baseline and length > dispatch.CUDNN_MAX_LEN:
            continue
          for mode, factor in (("fwd", 1.0), ("bwd", 2.5), ("fwd+bwd", 3.5)):
            try:
              r = time_impl(impl, q, k, v, seg, end, mode=mode, iters=iters, causal_baseline=baseline)
            except Exception as e:  # noqa: BLE001 - record the failure, keep the matrix going
              out.append(dict(L=length, D=d, mask=mask, impl=impl, mode=mode,
                              error=f"{type(e).__name__}: {e}"[:300]))
              continue
            flops = 4 * hq * d * factor
            out.append(dict(
                L=length, D=d, B=b, H=hq, mask=mask, impl=impl + ("(is_causal)" if baseline else ""),
                mode=mode,
                ms=round(r["seconds"] * 1e3, 3),
                useful_tflops=round(flops * allowed / r["seconds"] / 1e12, 1),
                executed_tflops=(round(flops * executed_pairs / r["seconds"] / 1e12, 1)
                                 if impl == "pallas" else None),
                peak_MiB=None if r["peak_bytes"] is None else round(r["peak_bytes"] / 2**20, 1)))
  return out


# ------------------------------------------------------------------------------------------------ main
def _print_table(rows: list[dict], title: str) -> None:
  if not rows:
    return
  keys = list(dict.fromkeys(k for r in rows for k in r))
  print(f"\n== {title}")
  print(" | ".join(keys))
  for r in rows:
    print(" | ".join(str(r.get(k, "")) for k in keys))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true", help="tiny sizes, every code path, nothing written")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  meta = dict(jax=jax.__version__, backend=jax.default_backend(), device=jax.devices()[0].device_kind,
              python=platform.python_version(), machine=platform.machine(), cpus=jax.local_device_count())
  if args.smoke:
    dense = xla_vs_chunked([256], iters=1)
    result = dict(meta=meta, sparsity=sparsity([1024], rows=1), xla_vs_chunked=dense,
                  closed_form_speedup=closed_form_speedup(dense),
                  gpu_matrix=gpu_matrix([256], [64], ["xla", "chunked", "pallas"], tokens_per_batch=256,
                                        hidden=128, iters=1, dtype=jnp.float32))
  else:
    # The demo's shape first (8 rows of 256, 4 / 2 heads of 32), then long rows.
    dense = (xla_vs_chunked([256], b=8, hq=4, hkv=2, d=32, iters=20)
             + xla_vs_chunked([512, 1024, 2048, 4096], iters=2))
    result = dict(meta=meta, sparsity=sparsity([2048, 4096, 8192, 16384]), xla_vs_chunked=dense,
                  closed_form_speedup=closed_form_speedup(dense))
    if jax.default_backend() == "gpu":
      result["gpu_matrix"] = gpu_matrix([2048, 4096, 8192, 16384], [64, 128],
                                        ["pallas", "cudnn", "xla", "chunked"])
  for key in ("sparsity", "xla_vs_chunked", "closed_form_speedup", "gpu_matrix"):
    _print_table(result.get(key, []), key)
  if not args.smoke:
    name = f"attention_{jax.default_backend()}.json"     # attention_cpu.json / attention_gpu.json
    path = Path(args.out) if args.out else RESULTS / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
  main()
