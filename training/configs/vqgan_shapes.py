# python training/train_vqgan.py --config training/configs/vqgan_shapes.py --workdir runs/vqgan_shapes
# tiny variant (seconds): --config training/configs/vqgan_shapes.py:tiny
# measure: python benchmarks/vqgan_shapes.py --model runs/vqgan_shapes/model
"""The shapes VQGAN: 64x64 shapes images -> 8x8 tokens, trained on a 2-core CPU in 20 minutes.

The recipe (`vqgan_train.shapes_config`):
- a narrow model (VQGAN_PRESETS["shapes"]: widths 8, 16, 32, 64, 0.76M params, 3 MB in
  fp32): flat-colour images need little width, and on a CPU the 64x64 and 32x32 levels
  cost almost all of the time;
- token-local codes (`model.local=True`, vqgan.py says how): the taming encoder's GroupNorm
  statistics and mid attention made every code depend on the whole image; the second
  bundled model's VQGAN gave the 105k all-black patches of 2,000 images 782 different
  codes (the commonest 0.4 %), and its transformer never learnt positions (0.19, chance).
  The local encoder is 1x1 below 64x64 and takes no norm statistics: a code sees its 8x8
  patch, 3 pixels before it and 10 after (measured by the input gradient);
- 2,048 codes of 16 dims (the preset's 1,024 reach 98.9 % at best: the patches that
  hold the edges of two objects of different colours with a 1-pixel gap between them are
  rare combinations 1,024 codes do not keep apart; 2,048: 99.3 %, below; 256 merged
  colours: below), EMA codebook drawn from the first
  batch, dead codes restarted from batch latents drawn in proportion to their squared
  distance to their code (`restart_from="error"`, k-means++ seeding): uniform draws land
  mostly on black background and split it into many codes by small differences of
  context; the codebook is in use from the first steps. Euclidean codes, not
  l2-normalised: with unit-norm codes the short runs lost colour (reconstructions grey,
  chroma 10 vs 20 on foreground pixels at equal time, most judge failures 'colour');
- L2 reconstruction loss, not L1: nine tenths of a shapes image is black background, and
  L1 gives every near-correct background pixel a full-size (sign) gradient, which drowns
  the objects' signal; L2's gradient shrinks with the error (short runs: PSNR 18.8 vs 16.8
  dB at equal time). No perceptual network offline, and flat colours need none;
- Adam at 1.5e-3 after 50 warmup steps (local codes: 3e-3 gave 98.0 %, 1.5e-3 98.9 %,
  1e-3 98.1 %; the global-code recipe wanted 3e-3), batch 8 (more updates per minute beat bigger
  batches at this budget), cosine decay to 0.1x that ends with the 19-minute wall-time
  budget (counted from the end of the first step's compile); the 20th minute holds the
  final eval and the export;
- a Polyak average of the parameters (`param_ema=0.998`, codebook included) is what is
  evaluated and exported (the raw parameters are evaluated too at the end, and the
  better on the held-out images is exported). Without it the in-run judge acceptance
  jumped around (0.45, 0.34, 0.79, 0.57 at steps 4,250-5,000) and the run ended at
  96.3 %; with it, 98.3 %. Eval and checkpoints every 500 steps (not 250): each costs
  ~1.3 s, time the updates need more;
- training reads shapes seed 0, the in-run eval seed 1, the benchmark seed 12345.

Measured (python benchmarks/vqgan_shapes.py --model runs/vqgan_shapes/model, 1,000
held-out images, seed 12345), 20-minute runs on the shared 2-core CPU:
- **this config** (2,048 codes; local codes, error-weighted restarts, parameter average,
  lr 1.5e-3) on the idle machine, 2026-11-22 05:22-05:42 UTC (1,146 s of training, then
  the final eval and the export): 8,500 steps, PSNR **39.0 dB**, codebook usage 94 %
  (perplexity 55), judge acceptance **99.3 %** (7 rejections: object count 5 - two large
  objects 1 pixel apart joined, the images every run misses -, shape 1, colour 1), code
  consistency 0.48, 652 codes for all-black patches (the commonest 43 % of them)
  (runs/vqgan_local_2048, `python benchmarks/vqgan_shapes.py --model
  runs/vqgan_local_2048/model --failures`). One run: the 1,024-code runs below that
  differ only in learning rate spread 98.0-98.9 %, so expect about that much noise.
  The bundled model's VQGAN is the 1,024-code run below (its transformer was trained on
  those codes; the lower consistency here, 0.48 against 0.70, is untried with the
  transformer): BUNDLED.md step 1 passes model.codebook_size=1024;
- the same with the preset's 1,024 codes, 2026-11-22 02:19-02:39 UTC (1,838 CPU-s in 1,147 s): 8,336 steps,
  PSNR 36.9 dB, codebook usage 99 % (perplexity 22), judge acceptance **98.9 %** (11
  rejections: object count 7, shape 3, colour 1), code consistency 0.70, the commonest
  code takes 69 % of the all-black patches (runs/vqgan_local_lr15): one image short of
  the target; the fourth bundled model's VQGAN;
- the same with `edge_weight=1.0` (vqgan_train.py: the squared error of neighbouring-pixel
  differences, which weights an isolated wrong pixel up, e.g. one lit inside the 1-pixel
  gap between two large objects in neighbouring cells), 2026-11-22 03:22-03:42 on the idle
  machine: 8,300 steps, PSNR **38.7 dB** (+1.8), code consistency 0.63, but judge acceptance
  98.3 % (17 rejections: colour 8, object count 6, shape 3; runs/vqgan_local_edge). The
  object-count rejections are the very images the 98.9 % run rejects too (two large
  objects 1 pixel apart reconstructed joined: "a purple circle and a red cross" -> one
  object of extent 37), and the extra colour misses are orange read as yellow (the
  closest pair in the palette). Off by default: sharper edges, not more accepted images.
  What bounds these runs: a code is one of 1,024 for an 8x8 patch; a patch that holds
  the edges of two objects of different colours with a 1-pixel gap between them is a
  rare combination the codebook does not keep apart, and the same held-out images fail
  in every run;
- the same with learning_rate=1e-3 (02:40-02:59): 8,100 steps, PSNR 35.7 dB, 98.1 % (the
  raw parameters won the in-run eval with 99.2 % of 256 images), consistency 0.55
  (runs/vqgan_local_lr10);
- the same with learning_rate=3e-3, on the idle
  machine, 2026-11-22 00:46-01:06 UTC (1,837 CPU-s in 1,147 s): 8,300 steps (the 1x1
  levels make a step ~13 % cheaper: 135 against 156 ms per step between the step-1,000
  and step-7,000 eval rows' `seconds` in the two runs' metrics.jsonl), PSNR 36.7 dB, codebook usage 99 % (perplexity
  36: most tokens are background), judge acceptance **98.0 %**; code consistency 0.54
  (the share of patches whose code is the commonest for their pixels; the previous
  VQGAN: 0.12), the commonest code takes 51 % of the all-black patches (previous: 0.5 %,
  782 codes). Rejections: shape 12 (mostly small circles drawn square), object count 5,
  colour 3. This is the third bundled model's VQGAN (runs/vqgan_local, copied to
  runs/vqgan_shapes; made before the lr runs above: pass learning_rate=0.003 to redo it). A 200-second run of it reached judge acceptance 0.47 at step 1,250
  (its cosine decay ended early); the global-code runs were at ~0.2 until step 4,500;
- the same, first try, with the norms normalising each position over its channels
  instead of no statistics: the gradient norm was inf from the first steps (black pixels'
  features start as exact zeros: variance 0); with no statistics anywhere (decoder
  included) the codebook collapsed (held-out perplexity 4.6 at step 500, PSNR stuck at
  16.8 dB). Hence statistics-free norms in the encoder only;
- the previous config (global codes: `local=False`, uniform restarts; with the parameter
  average) on the idle machine, 2026-11-21 22:04-22:24
  UTC (1,782 CPU-s in 1,146 s): 7,100 steps, PSNR 34.5 dB, codebook usage 100 %
  (perplexity 785), judge acceptance **98.3 %**, decode 3.7 ms/image; the average won
  the final held-out eval (98.8 % vs 98.0 % raw, 256 images). This is the VQGAN of the
  second bundled model (runs/vqgan_shapes_ema, copied to runs/vqgan_shapes). What the judge
  rejects (`--failures`): 9 images with an object too few or too many (two nearby
  objects joined into one), 5 with a wrong shape (mostly small circles drawn square),
  4 with a wrong colour (yellow/orange), 1 with a wrong cell; the 96.3 % run had 18
  colour, 11 object-count and 10 shape misses;
- the same with learning_rate=1.5e-3 (22:25-22:46, partly shared with short memory
  probes: 6,700 steps): the loss dropped earlier (the sharp PSNR rise came at step
  ~3,500, not ~4,500), but it ended lower: 33.1 dB, 96.8 % (the raw parameters won);
- that config without the parameter average (1,024 codes) on the idle machine, 2026-11-21 21:14-21:34 UTC (load average
  1.55, 1,776 CPU-s in 1,146 s): 7,050 steps, PSNR 33.2 dB, codebook usage 100 %
  (perplexity 734 of 1,024), judge acceptance 96.3 %; decode 4.1 ms/image
  (runs/vqgan_shapes_idle; in-run eval on 256 images: 16 % at step 1,750, 57 % at 5,000,
  88 % at 5,500, 96 % at 7,000, still rising when the budget ended);
- the same config at load average ~4 (925 CPU-s in 1,152 s): 3,550 steps, PSNR
  30.2 dB, codebook usage 98 % (perplexity 671 of 1,024), judge acceptance 86.2 %;
  decode 5.1 ms/image. This is the VQGAN inside the first bundled model (trained before
  the idle-machine run existed);
- with 256 codes (model.codebook_size=256), load ~4: 4,450 steps, PSNR 28.3 dB, usage
  100 % (perplexity 199), acceptance 77.2 %; at load 8-13: 1,888 steps, 23.0 dB, 24.7 %.
The 99 % target is met by this config (99.3 %, one run; the standard error of a rate near
99 % on 1,000 images is +-0.3 %, and 1,024-code runs that differ only in LR spread
98.0-98.9 %). The 256-code failures were mostly colour (shapes kept, chroma
lost), hence the 1,024 codes.
"""

from dalle_mini_jax.vqgan_train import VQGANTrainConfig, shapes_config, tiny_config


def cells_config() -> VQGANTrainConfig:
    """The cell VQGAN: one code per cell of the shapes grid, 35 minutes on a 2-core CPU.

        dalle-mini-jax train-vqgan --config training/configs/vqgan_shapes.py:cells --workdir runs/vqgan_cells
        python benchmarks/vqgan_shapes.py --model runs/vqgan_cells/model --layout centred --failures

    The canvas enlarged to 96x96 by nearest neighbour (`shapes.from_canvas`; 3 cells of
    21 pixels become 3 patches of 32, and every object, jitter and size included, lies
    inside its cell's patch: tests/test_shapes.py), f32 (six levels, widths 8, 16, 32,
    64, 64, 64) and patch codes (`VQGANConfig.patch_codes`): a code is a function of its
    cell alone, so a transformer writes 9 codes, one per cell, instead of 64 that each
    hold a piece of an object (BUNDLED.md, "The cell VQGAN": the sixth bundled model,
    overall 0.600 against 0.493 over 8x8 codes; the seventh, over this same VQGAN, 0.969).

    Measured, 2026-12-02 06:02-06:37 UTC, 2-core CPU (this config but for the in-run eval,
    which read jittered images then): 8,850 steps; `benchmarks/vqgan_shapes.py --layout
    centred` (1,000 held-out images without jitter): judge acceptance **99.5 %** (5
    rejections, all a white square read as a circle), PSNR 36.3 dB, code consistency 1.0,
    one code for an empty cell, 256 codes of which 80 % in use, 3.3 MB in fp32. On the
    spec's jittered images (`--layout free`): 36 %, PSNR 22.7 dB: it has never seen a
    jitter, and nothing needs it to: it is trained on centred images and encodes the
    transformer's training images centred too (`shapes:...:reading_centred`; a centred
    image is an image of the spec, whose jitter is a "may"). The in-run loss fell late:
    train L2 0.0097 at step 2,000, 0.00097 at 5,000, 0.00038 at 8,000.

    What did not work on the way (runs of this shape, in-run judge on jittered images):
    - 1,024 codes: a batch of 8 holds only 8 x 9 = 72 latents, and every code was
      "dead" at each restart check (1 % of the codes in use at step 250); hence 256;
    - the spec's jittered training images: a cell holds one of 64 x 9 + 1 things, the
      codes went to the jitters first and the colours were merged (reconstructions grey;
      3 % at step 1,000, 12 % at 2,500); hence centred images;
    - nearest-neighbour upsampling in the decoder (the taming one): no faster at 2,000
      steps than the depth-to-space upsampling now used (vqgan.Upsample), which is kept
      because each 2x2 child has its own map.

    Tried for a shorter run (2026-12-02, 07:58-08:39 UTC; in-run judge on 256 held-out
    centred images; both runs `time_budget_s=1200`, so the LR decays over 20 minutes):
    - this config, 20 minutes: 11, 19, 34, 63, 89 % at steps 1,000-5,000; 5,350 steps;
      `benchmarks/vqgan_shapes.py --layout centred`: 93.9 %;
    - filled grids (`data=shapes:inf:0:centred:grid`, `shapes.GRID_MIX`: ~3.7x the
      objects a step; measured with an earlier random stream for the grids, since
      changed so that no other shapes stream shares it): 17, 64, 78, 82, 87 % at the same
      steps, so faster early but not at the end; 5,500 steps, 92.2 % (misses: mostly a
      square or cross read as a circle, i.e. corners not yet sharp). Neither reaches the 35-minute run's 99.5 %, so that stays the recipe.
    """
    base = shapes_config()
    model = base.model.replace(resolution=96, channel_mult=(1, 2, 4, 8, 8, 8), patch_codes=True,
                               codebook_size=256)
    # 35 minutes (the last one holds the final eval and the export); eval every 1,000
    # steps on held-out centred images, like the training ones.
    return base.replace(model=model, data="shapes:inf:0:centred", eval_data="shapes:256:1:centred",
                        time_budget_s=2100, eval_every=1000)


def get_config(variant: str | None = None) -> VQGANTrainConfig:
    if variant == "tiny":  # the tiny VQGAN on 16x16 shapes: every stage in seconds
        return tiny_config()
    if variant == "cells":
        return cells_config()
    if variant not in (None, ""):
        raise ValueError(f"unknown variant {variant!r}: use none, 'tiny' or 'cells'")
    return shapes_config()
