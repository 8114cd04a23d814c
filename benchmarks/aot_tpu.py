"""Which preset fits where: ahead-of-time compiles of the train step for TPU pod topologies, on a CPU host.

  python -m benchmarks.aot_tpu                                   # the default cases -> results/aot_tpu.json
  python -m benchmarks.aot_tpu --cases=0p5b-v5e16,7b-v5p64       # a subset (results merge into the JSON)
  python -m benchmarks.aot_tpu --list                            # the cases and their meshes
  python -m benchmarks.aot_tpu --cases= --merge=other.json       # merge another run's cases, no compile

Needs libtpu (requirements-tpu.txt): `jax.experimental.topologies.get_topology_desc` gives abstract TPU
devices, and `train.compile_train_step` compiles the real train step (production mesh rules, the preset's
model, bf16 compute, remat, AdamW state) through XLA:TPU and Mosaic. Per case it records:
  - per-device memory from `memory_analysis()`: arguments + temporaries + outputs - aliases (the donated
    state is aliased to the new state), against the chip's HBM; when XLA:TPU itself refuses the program
    (RESOURCE_EXHAUSTED at compile time) the case is "does not fit" with the compiler's numbers;
  - compile time on this host: wall seconds (a shared 2-core CPU: indicative only) and CPU seconds;
  - compiled FLOPs per device (`cost_analysis()["flops"]`) next to flops.train_flops / device count, on
    full text rows (one causal document per row). XLA counts a scanned layer stack's loop body once, does
    not see into the Mosaic attention kernel, and sees full remat's recomputed forward, so the compiled
    count is also compared with `scan_once` (add_formula): the formula's matmuls outside the layers plus
    one decoder and one flow-head layer x 4/3.
Each case states its mesh (data, fsdp, tensor, sequence): FSDP over the chips, tensor = 2 where every head
count divides (train.validate_config: 0.5B's flow head has 7 kv heads, so it runs tensor = 1), and the
global batch (one row of the preset's seq_len per FSDP shard).
"""

from __future__ import annotations

import os

# libtpu on a host without a TPU: let several processes load it and say which chip we pretend to be
# (quiets a warning; the topology given to get_topology_desc decides the real target).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-16")

import dataclasses  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.experimental import topologies  # noqa: E402

from tuna2_jax import flops, sequence, sharding, train  # noqa: E402
from tuna2_jax.model.config import ModelConfig  # noqa: E402

GIB = 1 << 30
# HBM per chip (GiB), keyed by the topology name's prefix.
HBM_GIB = {"v5e": 16, "v5p": 95, "v6e": 32, "v4": 32}


@dataclasses.dataclass(frozen=True)
class Case:
  size: str                 # configs/tuna2_<size>.py
  topology: str             # get_topology_desc topology_name
  mesh: dict                # data, fsdp, tensor, sequence
  batch: int                # global batch (rows)
  seq_len: int = 0          # 0: the preset's data.seq_len
  attention: str = "pallas"
  note: str = ""


CASES = {
    # 0.5B: tensor = 1 (flow_kv_heads = 7); one 16K row per chip.
    "0p5b-v5e16": Case("0p5b", "v5e:4x4", dict(data=1, fsdp=16), 16),
    "0p5b-v5e16-8k": Case("0p5b", "v5e:4x4", dict(data=1, fsdp=16), 16, seq_len=8192,
                          note="half the preset's row length"),
    "0p5b-v6e16": Case("0p5b", "v6e:4x4", dict(data=1, fsdp=16), 16),
    "0p5b-v5p64": Case("0p5b", "v5p:4x4x4", dict(data=1, fsdp=64), 64),
    # 1.5B: heads 12 / 2, flow 24 / 6: tensor = 2 inside a slice, one row per two chips.
    "1p5b-v5e16": Case("1p5b", "v5e:4x4", dict(data=1, fsdp=8, tensor=2), 8),
    "1p5b-v6e16": Case("1p5b", "v6e:4x4", dict(data=1, fsdp=8, tensor=2), 8),
    "1p5b-v5e256": Case("1p5b", "v5e:16x16", dict(data=1, fsdp=128, tensor=2), 128),
    "1p5b-v5p64": Case("1p5b", "v5p:4x4x4", dict(data=1, fsdp=32, tensor=2), 32),
    # 7B: heads 28 / 4, flow 56 / 14: tensor = 2.
    "7b-v5p64": Case("7b", "v5p:4x4x4", dict(data=1, fsdp=32, tensor=2), 32),
    "7b-v5e256": Case("7b", "v5e:16x16", dict(data=1, fsdp=128, tensor=2), 128),
    "7b-v6e256": Case("7b", "v6e:16x16", dict(data=1, fsdp=128, tensor=2), 128),
}
DEFAULT_CASES = "0p5b-v5e16,0p5b-v5e16-8k,1p5b-v5e16,7b-v5p64"

flags.DEFINE_string("cases", DEFAULT_CASES, f"comma-separated names of {sorted(CASES)}, or 'all'")
flags.DEFINE_string("attention", "", "override every case's attention backend (pallas | chunked)")
flags.DEFINE_bool("list", False, "print the cases and exit")
flags.DEFINE_bool("fresh", False, "start a new JSON instead of merging into the existing one")
flags.DEFINE_string("merge", "", "JSON files of other runs (e.g. other hosts) whose cases merge into --out")
flags.DEFINE_string("out", "benchmarks/results/aot_tpu.json", "JSON result file (cases merge into it)")
FLAGS = flags.FLAGS
ROOT = pathlib.Path(__file__).resolve().parents[1]


def case_config(case: Case):
  c = importlib.import_module(f"configs.tuna2_{case.size}").get_config()
  c.mesh.shape.update(dict(dict(data=1, fsdp=1, tensor=1, sequence=1), **case.mesh))
  c.mesh.rules = "tpu_pod"
  c.data.global_batch_size = case.batch
  if case.seq_len:
    c.data.seq_len = case.seq_len
  c.model.attention = FLAGS.attention or case.attention
  return c


def formula_flops(c) -> dict[str, float]:
  """flops.train_flops on full text rows (one causal document per row): the total, without attention, and
  what XLA's cost analysis can see of it (`scan_once`, see add_formula)."""
  cfg = ModelConfig.from_dict(c.model.to_dict())
  rows, length = c.data.global_batch_size, c.data.seq_len
  batch = sequence.text_batch(np.zeros((rows, length), np.int32), cfg.patch_size)
  total = flops.train_flops(cfg, batch)
  pairs = flops.allowed_pairs(batch["segment_ids"], batch["attn_end"], batch["positions"])
  widths = np.array([cfg.num_heads * cfg.head_dim, cfg.flow_heads * cfg.flow_head_dim], np.float64)
  attn_per_layer = 3.0 * 4 * pairs * widths
  attn = float(attn_per_layer @ np.array([cfg.num_layers, cfg.flow_layers]))
  # Matmuls outside the layer stacks, and of one decoder + one flow-head layer (no validation needed: the
  # formula is arithmetic on the fields).
  outside = flops.train_flops(dataclasses.replace(cfg, num_layers=0, flow_layers=0), batch)
  one_each = flops.train_flops(dataclasses.replace(cfg, num_layers=1, flow_layers=1), batch) - outside
  one_each -= float(attn_per_layer.sum())
  remat = 4 / 3 if cfg.remat == "full" else 1.0
  return dict(total=total, matmul=total - attn, attention=attn, scan_once=outside + remat * one_each)


def add_formula(row: dict, c) -> None:
  """Formula FLOPs per device next to the compiled ones.

  The layers are `nn.scan`ned (model.scan_layers), and XLA's cost analysis counts a while loop's body once,
  not once per iteration; the Mosaic attention kernel is a custom call it does not count; full remat adds a
  recomputed forward of each layer (x 4/3 on the layers). So the compiled count is compared with
  `scan_once`: the matmuls outside the layer stacks + one decoder and one flow-head layer's matmuls x 4/3.
  """
  form, n = formula_flops(c), row["chips"]
  row.update(formula_flops_per_device=form["total"] / n, formula_matmul_flops_per_device=form["matmul"] / n,
             formula_scan_once_flops_per_device=form["scan_once"] / n)
  if row.get("compiled_flops_per_device"):
    row["compiled_over_formula"] = row["compiled_flops_per_device"] / row["formula_flops_per_device"]
    row["compiled_over_formula_scan_once"] = (row["compiled_flops_per_device"]
                                              / row["formula_scan_once_flops_per_device"])
    row.pop("compiled_over_formula_matmul_x4_3", None)


def parse_oom(message: str) -> dict:
  """The compiler's numbers from a RESOURCE_EXHAUSTED message (GiB as XLA prints them, 'G')."""
  out: dict = {"message": message.strip().splitlines()[0][:400]}
  m = re.search(r"required for ([\w ]+?) \(([\d.]+)([GM])\) exceeds available HBM \(([\d.]+)([GM])\)",
                message)
  if m:
    scale = lambda v, u: float(v) / (1024 if u == "M" else 1)
    out.update(required_what=m.group(1), required_gib=scale(m.group(2), m.group(3)),
               available_gib=scale(m.group(4), m.group(5)))
  return out


def run_case(name: str, case: Case) -> dict:
  c = case_config(case)
  devices = topologies.get_topology_desc(platform="tpu", topology_name=case.topology).devices
  chip = case.topology.split(":")[0]
  row: dict = dict(case=name, size=case.size, topology=case.topology, chips=len(devices),
                   device_kind=devices[0].device_kind, mesh=dict(c.mesh.shape), rules=c.mesh.rules,
                   global_batch=c.data.global_batch_size, seq_len=c.data.seq_len, attention=c.model.attention,
                   dtype=c.model.dtype, remat=c.model.remat, grad_accum=c.optim.grad_accum,
                   ema=c.optim.ema_decay > 0, hbm_gib=HBM_GIB.get(chip), note=case.note)
  t0, cpu0 = time.perf_counter(), time.process_time()
  try:
    compiled = train.compile_train_step(c, sharding.make_mesh(c.mesh.shape.to_dict(), devices))
  except Exception as e:  # noqa: BLE001  (a case that cannot compile is a result, not a crash)
    row.update(compile_s=time.perf_counter() - t0, compile_cpu_s=time.process_time() - cpu0)
    msg = str(e)
    if "RESOURCE_EXHAUSTED" in msg or "Ran out of memory" in msg:
      row.update(fits=False, oom=parse_oom(msg[msg.find("RESOURCE_EXHAUSTED"):]))
    else:
      row.update(fits=None, error=f"{type(e).__name__}: {msg[:600]}",
                 traceback=traceback.format_exc().splitlines()[-6:])
    add_formula(row, c)
    return row
  # Wall time depends on the load of the shared host; CPU seconds (all threads) much less so.
  row.update(compile_s=time.perf_counter() - t0, compile_cpu_s=time.process_time() - cpu0)
  mem = compiled.memory_analysis()
  parts = {k: int(getattr(mem, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp",
                                                                  "generated_code")}
  total = parts["argument"] + parts["temp"] + parts["output"] - parts["alias"]
  row.update(memory_bytes=parts, per_device_gib=total / GIB, fits=bool(row["hbm_gib"] and total <=
                                                                         row["hbm_gib"] * GIB))
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  row["compiled_flops_per_device"] = float(cost.get("flops", float("nan")))
  row["uses_mosaic_kernel"] = "tpu_custom_call" in compiled.as_text()
  add_formula(row, c)
  return row


def table(rows: list[dict]) -> str:
  lines = ["| case | chips (mesh d/f/t/s) | batch x L | attn | per-device GiB | HBM | fits | "
           "compile s (CPU s) | compiled TFLOP/dev | formula TFLOP/dev | compiled / formula scan-once |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    m = r["mesh"]
    mesh = f"{r['chips']} ({m['data']}/{m['fsdp']}/{m['tensor']}/{m['sequence']})"
    if "per_device_gib" in r:
      mem = f"{r['per_device_gib']:.1f}"
    elif r.get("oom", {}).get("required_gib"):
      mem = f"> {r['oom']['required_gib']:.1f} ({r['oom']['required_what']})"
    else:
      mem = "error" if "error" in r else "?"
    fits = {True: "yes", False: "no", None: "?"}[r.get("fits")]
    comp = f"{r['compiled_flops_per_device'] / 1e12:.1f}" if "compiled_flops_per_device" in r else "-"
    ratio = f"{r['compiled_over_formula_scan_once']:.2f}" if "compiled_flops_per_device" in r else "-"
    compile_s = f"{r['compile_s']:.0f} ({r.get('compile_cpu_s', float('nan')):.0f})"
    lines.append(f"| {r['case']} | {mesh} | {r['global_batch']}x{r['seq_len']} | {r['attention']} | {mem} | "
                 f"{r['hbm_gib']} | {fits} | {compile_s} | {comp} | "
                 f"{r['formula_flops_per_device'] / 1e12:.1f} | {ratio} |")
  return "\n".join(lines)


def write_results(out: pathlib.Path, rows: list[dict]) -> dict[str, dict]:
  """Merges `rows` into the JSON at `out` (re-read first: cases of other invocations, in parallel or
  earlier, are kept) and rewrites it; returns all rows by case name."""
  import libtpu  # noqa: PLC0415  (only for its version)
  previous = json.loads(out.read_text()) if out.exists() else {}
  results = {r["case"]: r for r in previous.get("results", [])}
  results.update({r["case"]: r for r in rows})
  for key, r in results.items():  # rows of earlier versions of this file get the current formula fields
    add_formula(r, case_config(CASES[key]))
  result = dict(
      benchmark="AOT train-step compile for abstract TPU topologies: per-device memory, fit, FLOPs",
      machine=dict(cpu_count=os.cpu_count(), platform=platform.platform(),
                   note="compile times are on a shared 2-core CPU host; loadavg per case"),
      versions=dict(python=platform.python_version(), jax=jax.__version__,
                    libtpu=getattr(libtpu, "__version__", "?")),
      method=dict(memory="memory_analysis(): argument + temp + output - alias bytes per device",
                  fits="per-device bytes <= the chip's HBM; 'no' also when XLA:TPU refuses the program "
                       "(RESOURCE_EXHAUSTED, its numbers under oom)",
                  formula="flops.train_flops on full text rows (one causal document per row) / chips",
                  compiled="cost_analysis()['flops'] of the per-device program: includes remat "
                           "recomputation, excludes the Mosaic attention kernel (custom call), counts "
                           "each scanned layer stack's loop body once",
                  scan_once="formula matmuls outside the layer stacks + one decoder and one flow-head "
                            "layer x 4/3 (full remat): what the compiled count can be compared with",
                  hbm_gib=HBM_GIB),
      cases_run=sorted(results), cases_not_run=sorted(set(CASES) - set(results)),
      results=[results[k] for k in CASES if k in results])
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2, default=float) + "\n")
  return results


def main(argv):
  del argv
  if FLAGS.list:
    for name, case in CASES.items():
      print(f"{name:16} {case}")
    return
  names = list(CASES) if FLAGS.cases == "all" else [n for n in FLAGS.cases.split(",") if n]
  unknown = [n for n in names if n not in CASES]
  if unknown:
    raise app.UsageError(f"--cases: unknown {unknown}; known {sorted(CASES)}")
  out = ROOT / FLAGS.out
  if FLAGS.fresh and out.exists():
    out.unlink()
  results = write_results(out, [r for f in filter(None, FLAGS.merge.split(","))
                                for r in json.loads(pathlib.Path(f).read_text())["results"]])
  for name in names:
    load_before = os.getloadavg()
    row = run_case(name, CASES[name])
    row.update(loadavg_before=load_before, loadavg_after=os.getloadavg(),
               run_at=time.strftime("%Y-%m-%d %H:%M"))
    print(json.dumps({k: v for k, v in row.items() if k != "traceback"}, default=float), flush=True)
    results = write_results(out, [row])  # after every case: a compile cut short keeps the cases before it
  print(table([results[k] for k in CASES if k in results]))
  print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)
