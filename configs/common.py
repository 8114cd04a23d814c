"""Shared pieces of the configs: the model size table, logical-axis rule presets, argument parsing.

Every `configs/<name>.py` builds its ConfigDict from these, grouped as
model, data, optim, train, mesh, checkpoint, eval.
"""

from __future__ import annotations

import ml_collections

# Qwen2.5 shapes (config.json of the public checkpoints) plus two CPU sizes.
MODEL_SIZES = {
    #         hidden layers heads kv head_dim mlp   vocab   tied  patch dtype
    "debug": (64, 2, 4, 2, 16, 128, 512, True, 8, "float32"),
    "tiny": (128, 4, 4, 2, 32, 384, 512, True, 8, "float32"),
    "0p5b": (896, 24, 14, 2, 64, 4864, 151_936, True, 16, "bfloat16"),
    "1p5b": (1536, 28, 12, 2, 128, 8960, 151_936, True, 16, "bfloat16"),
    "7b": (3584, 28, 28, 4, 128, 18944, 152_064, False, 16, "bfloat16"),
}

# Flow head shapes; its width is always the decoder's hidden size (the release: no projection between them).
# 7b is the release's head (16 blocks, 56 q / 14 kv heads of dim 64, MLP = the Qwen intermediate size).
# Smaller presets keep its ratios: head_dim 64, heads = hidden / 64, about 4 q heads per kv head, MLP = the
# decoder's, and about half the decoder's depth (16 of 28 in the release).
FLOW_HEAD_SIZES = {
    #         layers heads kv head_dim mlp
    "debug": (2, 4, 2, 16, 128),
    "tiny": (2, 4, 2, 32, 384),
    "0p5b": (12, 14, 7, 64, 4864),
    "1p5b": (14, 24, 6, 64, 8960),
    "7b": (16, 56, 14, 64, 18944),
}

# Tuna-R's vision encoder (SigLIP-shaped ViT; its patch size is the model's). layers = the checkpoint's; the
# encoder keeps all but the last (feature layer -2). so400m is SigLIP2-So400M/16 with the release's 32 x 32
# position table (512 px); the CPU sizes keep its ratios (head_dim 72 -> 16, MLP ~3.7x).
VISION_SIZES = {
    #          hidden layers heads mlp  pos_grid
    "debug": (32, 3, 2, 96, 4),
    "tiny": (64, 5, 4, 240, 16),
    "so400m": (1152, 27, 16, 4304, 32),
}


def vision_config(size: str, **overrides) -> dict:
  """The model fields that make a Tuna-R (variant "tuna_r") with a VISION_SIZES encoder."""
  if size not in VISION_SIZES:
    raise ValueError(f"vision size {size!r} not in {sorted(VISION_SIZES)}")
  hidden, layers, heads, mlp, grid = VISION_SIZES[size]
  fields = dict(
      variant="tuna_r", vision_hidden_size=hidden, vision_num_layers=layers, vision_num_heads=heads,
      vision_mlp_dim=mlp, vision_pos_grid=grid, vision_feature_layer=-2, vision_ln_eps=1e-6,
      # "bicubic": SigLIP's interpolate_pos_encoding, what the release ran (and its weights expect);
      # "bilinear": SigLIP2 NaFlex's antialiased resize, for encoders trained from scratch here.
      vision_pos_resize="bicubic" if size == "so400m" else "bilinear",
  )
  fields.update(overrides)
  return fields


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'size=tiny,steps=100,runlocal' -> ConfigDict over `defaults` (types follow the defaults)."""
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"config argument {key!r} not in {sorted(defaults)}")
    kind = type(defaults[key])
    if kind is bool:
      out[key] = value.lower() in ("", "1", "true", "yes")
    else:
      out[key] = kind(value)
  return out


def model_config(size: str, **overrides) -> ml_collections.ConfigDict:
  """The `model` section for a size of MODEL_SIZES (fields of tuna2_jax.model.config.ModelConfig)."""
  if size not in MODEL_SIZES:
    raise ValueError(f"model size {size!r} not in {sorted(MODEL_SIZES)}")
  hidden, layers, heads, kv, head_dim, mlp, vocab, tied, patch, dtype = MODEL_SIZES[size]
  m = ml_collections.ConfigDict(dict(
      vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv,
      head_dim=head_dim, mlp_dim=mlp, tie_embeddings=tied, patch_size=patch, dtype=dtype,
      param_dtype="float32",
      rope_theta=1e6, rms_eps=1e-6, qkv_bias=True,
      # "1d" (the paper) or "mrope" (Qwen2-VL sections over (t, row, col)).
      rope="1d", mrope_section=(),
      time_embed_dim=256, patch_norm_eps=1.1920929e-07,
      # "xla" dense masked attention; "chunked" online softmax with O(L) memory for long rows.
      attention="xla" if size in ("debug", "tiny") else "chunked", attention_chunk=512,
      # none | full | dots | dots_no_batch: what the backward pass keeps per layer.
      remat="none" if size in ("debug", "tiny") else "full",
      scan_layers=True,
  ))
  flow_layers, flow_heads, flow_kv, flow_head_dim, flow_mlp = FLOW_HEAD_SIZES[size]
  m.update(dict(
      flow_layers=flow_layers, flow_heads=flow_heads, flow_kv_heads=flow_kv, flow_head_dim=flow_head_dim,
      flow_mlp_dim=flow_mlp, flow_rms_eps=1e-5,
      # 3-D RoPE (frame, row, col) on patches; () = 1/4, 3/8, 3/8 of the pairs (the release: 16:24:24).
      flow_rope_theta=1e4, flow_rope_section=(),
      # the head's 1-D text RoPE: theta 5e5 with llama3 scaling factor 32 (the release); 1.0 = no scaling.
      flow_text_rope_theta=5e5, flow_text_rope_scaling=32.0,
      # "spatial" (default) or "raster_chunks" (the release's output mapping, to load its weights).
      unpatchify="spatial",
  ))
  m.update(overrides)
  return m


# Mesh shapes per target; the one -1 axis takes the remaining devices. Override any axis on the command line
# (--config.mesh.shape.tensor=4); benchmarks/aot_tpu.py shows which preset fits which TPU topology.
MESH_PRESETS = {
    "cpu": dict(data=-1),                 # laptops, CI: plain data parallelism
    "gpu_node": dict(fsdp=-1, tensor=8),  # FSDP across nodes, tensor parallel inside an 8-GPU NVLink node
    "tpu_pod": dict(fsdp=-1),             # FSDP over the slice (ICI) and slices (DCN)
}
# Sizes whose head counts take a 2-way tensor axis on a pod (0.5B's flow head has 7 KV heads: FSDP only).
POD_TENSOR = {"1p5b": 2, "7b": 2}


def mesh_config(preset: str = "cpu", **shape) -> ml_collections.ConfigDict:
  """Mesh axes (data, fsdp, tensor, sequence) from a MESH_PRESETS entry plus overrides."""
  axes = dict(data=1, fsdp=1, tensor=1, sequence=1)
  axes.update(MESH_PRESETS[preset])
  axes.update(shape)
  # rules: a preset of tuna2_jax.sharding.RULES (fsdp_tp | gpu_node | tpu_pod) or explicit pairs.
  return ml_collections.ConfigDict(dict(shape=axes, rules=preset if preset != "cpu" else "fsdp_tp"))


def base_config(size: str, *, steps: int, seq_len: int, batch_size: int) -> ml_collections.ConfigDict:
  """All sections with defaults; each named config adjusts what it needs."""
  c = ml_collections.ConfigDict()
  c.model = model_config(size)

  c.data = ml_collections.ConfigDict()
  c.data.dataset = "shapes"         # shapes, digits, folder, TFDS names, mixes "shapes:3,digits@generate:1"
  c.data.data_dir = "runs/data"     # where the TFDS / ArrayRecord builders wrote it
  c.data.seq_len = seq_len          # tokens per packed row
  c.data.global_batch_size = batch_size
  c.data.tokenizer = "byte"         # byte | hf:<path to tokenizer.json>
  c.data.seed = 0
  c.data.num_workers = 0            # Grain worker processes (0 = in-process)
  c.data.train_split = "train"
  c.data.eval_split = "test"        # make_eval_examples reads it
  # Tasks drawn per example (renormalised over what it supports): the paper's 7 : 3 generation :
  # understanding over image data plus 20% text-only, an eighth of generation given to editing, a sixth
  # of understanding to two-image "compare" documents (interleaved multi-image).
  c.data.task_weights = ml_collections.ConfigDict(dict(understand=0.2, compare=0.04, generate=0.49, edit=0.07,
                                                       text=0.2))
  c.data.cfg_drop_prob = 0.1        # a generation / edit document drops its prompt (CFG's unconditional)
  c.data.image_mode = "free"        # free: own aspect ratio, sides multiples of p | buckets: nearest bucket
  c.data.max_image_patches = 256    # patch budget per image (the paper: ~1K at p=16); rows may lower it
  c.data.bucket_aspects = (1.0, 7 / 9, 9 / 7, 4 / 7, 7 / 4)  # height/width of buckets (image_mode=buckets)
  c.data.max_qa_turns = 4           # question-answer turns per understanding document
  c.data.qa_first_kinds = ()        # question kinds asked first (tuna2_jax/input/tasks.py says why)
  c.data.qa_first_prob = 1.0        # in this share of understanding documents
  c.data.packing = "best_fit"       # best_fit | first_fit (grain.experimental packers)
  c.data.packing_bins = 32          # rows packed at once; more bins = less padding, more memory
  c.data.max_skip_fraction = 0.05   # stop when more records than this are corrupt (after 100 seen)
  c.data.max_image_side = 4096      # larger images count as invalid records
  c.data.image_key = "image"        # feature names for a generic TFDS dataset
  c.data.text_key = "caption"
  c.data.read_threads = 1           # Grain read threads per process (more is slower on 2 cores)
  c.data.prefetch = 16              # elements read ahead per process

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-4                 # peak learning rate (the paper's stage 1)
  c.optim.schedule = "cosine"       # constant | cosine | linear | wsd (after warmup)
  c.optim.warmup_steps = 100
  c.optim.end_lr_factor = 0.0       # final lr as a fraction of optim.lr (cosine / linear / wsd)
  c.optim.decay_fraction = 0.2      # wsd: the last fraction of the steps after warmup that decays
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.95, 1e-8
  c.optim.weight_decay = 0.01
  c.optim.clip_norm = 1.0
  c.optim.ema_decay = 0.0           # 0 disables the parameter EMA (the release uses 0.9999)
  c.optim.grad_accum = 1            # micro-batches per step

  c.train = ml_collections.ConfigDict()
  c.train.steps = steps
  c.train.seed = 0
  c.train.log_every = 10
  c.train.text_loss_weight = 1.0
  c.train.flow_loss_weight = 1.0    # the release: flow 1.0, NTP 1.0
  # JiT flow matching (t = 1 clean): t = sigmoid(N(p_mean, p_std)) per generation image,
  # eps ~ N(0, noise_scale^2).
  c.train.flow_p_mean, c.train.flow_p_std = -0.8, 0.8
  c.train.noise_scale = 2.0         # the release at 512 px; JiT scales it with resolution / 256
  c.train.t_eps = 0.05              # clamp of 1 - t in the v-loss weight and the sampler
  # Understanding images: t = 1, but with this probability t = 1 - U(0, und_noise_max)
  # (the release: 0.1, 0.1).
  c.train.und_noise_prob, c.train.und_noise_max = 0.1, 0.1
  # Masked visual feature learning (the paper): in the last mask_last_fraction of training, each document is
  # masked with probability mask_prob, a ratio r ~ U(mask_ratio_min, mask_ratio_max) of every image's patches
  # (none when r <= 0). The release's form: mask_last_fraction=1, mask_prob=1, r ~ U(-0.7, 0.3)
  # (tuna2_jax.flow.MASKING_PRESETS["release"]). mask_prob = 0 turns masking off.
  c.train.mask_last_fraction = 0.4
  c.train.mask_prob = 0.5
  c.train.mask_ratio_min, c.train.mask_ratio_max = 0.0, 0.5

  c.mesh = (mesh_config() if size in ("debug", "tiny")
            else mesh_config("tpu_pod", tensor=POD_TENSOR.get(size, 1)))

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 500          # save every this many steps (and always at the end and on SIGTERM)
  c.checkpoint.keep = 3             # the most recent checkpoints kept
  c.checkpoint.keep_every = 0       # also keep every step divisible by this one forever (0: none)
  c.checkpoint.async_save = True    # write in a background thread; the loop blocks only for the host copy
  # Warm start when the workdir has no checkpoint: another run's workdir (or its checkpoints/<step>),
  # parameters only; or an HF Qwen2 directory (decoder weights in, multimodal parameters fresh).
  c.checkpoint.init_from = ""

  c.eval = ml_collections.ConfigDict()
  c.eval.every = 0                  # steps between evaluations in training (0: none)
  c.eval.num_examples = 64          # held-out examples for understanding and caption perplexity
  c.eval.periodic_examples = 16     # the subset evaluated every eval.every steps
  c.eval.gen_num = 32               # held-out prompts to generate and score
  c.eval.gen_size = 0               # side of the generated squares; 0 = the largest under max_image_patches
  c.eval.gen_steps = 25             # ODE steps (the release: 50)
  c.eval.cfg_scale = 3.0            # guidance on x-hat (the release's T2I scale)
  c.eval.sampler = "euler"          # euler | heun
  c.eval.time_shift = 1.0
  c.eval.recon_num = 8              # held-out images for reconstruction PSNR
  c.eval.max_new_tokens = 16        # answer length cap (greedy decoding)
  c.eval.batch_size = 64            # questions decoded at once
  c.eval.seed = 0
  return c
