"""The `make demo` config: tiny Tuna-2 tuned to learn visibly in about 10 minutes of a 2-core CPU.

What changed from tuna2_tiny and why (each measured against the 10-minute budget; docs/demo_tuning.md):
  - understanding and editing on the `shapes/small` scenes (48 x 48 px, 1-3 shapes each inside its own cell
    of the 3 x 3 position grid, a word on the 8-px grid in 80 % of them, no left-of / above questions),
    generation on the `shapes/draw` drawings (one 17-26 px shape in the middle of 48 x 48, below the word
    where they would overlap, and in 80 % of them a word on the top row), mixed 4 : 6 (the paper: 3 : 7, at
    which reading stayed on its plateau, run f2): in ten minutes the model learns to draw a named shape in
    the named color (from 5 seeds of 6, runs cf0-cf5; it reads from 5, both from 4), and not yet to lay
    out the scenes of `small` (docs/demo_tuning.md); drawing the words is what makes it read them (runs
    w0-w2 against f1s1, f1s2); the shapes' size trades the drawings' colors against reading (runs w, m, b:
    14-23, 17-26, 20-30 px); 36 patches of 8 px an image, rows of 256 tokens, 8 rows a step: ~2K tokens a
    step, ~1400 steps in the budget;
  - a 512-id byte-level BPE trained on the dataset's text (tuna2_jax.input.bpe; the demo writes it next to
    the data): texts ~4x shorter than bytes, every answer one or two tokens;
  - a scene's questions in one understanding document (max_qa_turns 8), the caption last; half of the
    documents ask where a shape is first (qa_first_kinds, qa_first_prob): with 1-D RoPE the model learns a
    place only from questions that stand right after the image, the other half keeps every kind there too;
  - lr 3e-3 with a short warmup: at 4e-3 places stay at chance, at 2e-3 and 3e-3 every kind of question is
    learned, and at 3e-3 the drawings follow the prompt more often (run l3s1);
  - a little editing (a tenth of the `small` documents; reconstruction runs through the editing path); no
    text-only data: its loss tokens drowned the few answer tokens of an understanding document;
  - noise scale 1 (JiT scales the noise with resolution; 2 is the release's at 512 px).

  python -m tuna2_jax.demo --workdir=runs/demo                       # what `make demo` runs
  python -m tuna2_jax.demo --workdir=runs/demo_long --config.train.steps=4200 --minutes=32
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, steps=1400, runlocal=False)
  c = common.base_config("tiny", steps=arg.steps, seq_len=256, batch_size=8)
  c.data.dataset = "shapes/small@understand+edit:4,shapes/draw@generate:6"
  c.data.data_dir = "runs/demo/data"
  c.data.tokenizer = "hf:runs/demo/data/tokenizer_shapes_small_512.json"  # tuna2_jax.demo writes it
  c.data.max_image_patches = 36
  c.data.max_qa_turns = 8
  c.data.qa_first_kinds = ("position",)
  c.data.qa_first_prob = 0.5
  c.data.task_weights.update(dict(understand=0.9, edit=0.1, generate=1.0, text=0.0))  # within each source
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 50
  c.optim.end_lr_factor = 0.1
  c.train.noise_scale = 1.0
  c.train.log_every = 25
  c.checkpoint.every = 250
  c.checkpoint.keep = 2
  c.eval.num_examples = 200
  c.eval.gen_num = 64
  c.eval.max_new_tokens = 8
  if arg.runlocal:  # shrink everything for a smoke run
    c.train.steps, c.data.global_batch_size = 4, 2
  return c
