"""Per-sample Adaptive Gradient Clipping: AGC on each example's gradient, before the batch mean.

The gradient applied is (1/N) * sum_i clip(g_i), where g_i is example i's gradient of its own loss
term and clip is AGC (Brock et al. 2021, Sec. 4, Eq. 3) applied per unit with the current weights.
AGC's threshold for a unit depends only on that unit's weight, so every parameter can be clipped
inside the backward pass of the layer that owns it, in the same single backward pass: no second
pass and no per-example gradients of the whole model.

How each layer does it (book-keeping, Bu et al. 2023; ghost norms, Li et al. 2022), one module per engine:

- `layers`: linear and convolution layers (plain, timm's weight-standardised ones, SAME-padded,
  grouped, depthwise, Conv1d) get a backward of their own. The gradient of the layer's effective
  weight for example i and output unit u is g_iu = sum_p delta_iu[p] * U_i[:, p], with U_i the
  input patches and delta the back-propagated signal. Either g_i is materialised in chunks of
  examples, and the clipped sum sum_i c_iu * g_iu is accumulated from it directly; or, where the
  layer has few output positions, its norms come from the Gram matrix of the patches
  (||g_iu||^2 = delta_iu^T U_i^T U_i delta_iu) and the clipped sum is one ordinary weight-gradient
  call on the signal scaled by c_iu; whichever costs less (`Layer.plan`). Weight standardisation
  is row-wise and linear in the gradient, so its per-example norms follow from sums over g_iu
  (`Standardization.grad_norms`) and its backward applies to the clipped sum.
- `containers`: scalar parameters of container modules (the SkipInit gain of an NF block) are handed to
  the block as a copy per example, so autograd delivers their per-example gradients directly
  (`PerExampleCopy`). They must act elementwise with broadcasting against the batch, as gains do.
- `generic`: any other module with parameters goes through torch.func (vmap of vjp) in chunks of
  examples: exact, slower. A module with children and a larger parameter of its own (timm's
  VisionTransformer with its cls_token and pos_embed, nn.MultiheadAttention, a block with a layer-scale
  vector) goes through it whole, children included (for a ViT: the whole model, at about the cost of
  torch.func's per-example gradients); so does a parameter used several times.

On CUDA the host, not the GPU, bounds such a backward pass (a layer's per-sample work is some forty small
kernels), so `graphs` captures each layer's per-sample work in a CUDA graph on its second call and replays it.

Module kinds, chosen (`clipper.engines`) or refused (`clipper.check_supported_modules`) when the clipper is
installed, before anything is trained (`Learner.agc(per_sample=True)` checks them already):

- `layers`: nn.Linear, nn.Conv1d, nn.Conv2d (plain, grouped, depthwise, timm's SAME-padded and
  weight-standardised);
- `containers`: scalar gains of blocks (SkipInit);
- `generic`, exact: nn.Embedding, nn.LayerNorm, timm's LayerScale, nn.MultiheadAttention (batch first or
  not, key_padding_mask, a 2-D attn_mask), nn.TransformerEncoderLayer, timm's VisionTransformer, any
  module that uses its own parameters in forward, once or several times;
- refused: nn.RNN, nn.GRU, nn.LSTM (torch.func cannot take their per-example gradients); dropout or
  drop-path with a rate above 0 inside a module that `generic` takes (its backward pass runs the forward
  pass again, with new masks); BatchNorm in training mode (it couples the examples);
- refused at the first batch, where a forward pass shows it: a layer called twice in one forward pass,
  or on rows that are not the model input's examples (sequence-first, examples merged with positions).

`loop` holds `per_sample_agc`, per-sample AGC for any training loop (no fastai; the fastai callback's per-sample
mode uses the same pieces). `clipper` holds `PerSampleClipper`, which chooses the engines and installs them. The
engines depend only on
`context.EngineContext`: `example_rule` (AGC's rule on per-example norms: lambda per parameter, the thresholds, the
signal's scale), which counts in `tally` (clipped, non-finite and seen (example, unit) pairs, on the device),
`recording` (the patched forwards: installed, when they record, their calls checked) and `graphs`. `loss_scale`
finds what the loss's reduction, gradient accumulation and a grad scaler multiplied each example's gradient by;
`clipped_sum` the clipped sum shared by the engines and the precision they compute in (bfloat16 signals stay
bfloat16, norms accumulate in float32); `tuning` the knobs a benchmark may turn (`TUNING`: scratch budget per
device, how k x k convolutions materialise g_i, the layers' CUDA graphs).

BatchNorm in training mode couples the examples of a batch: per-example gradients do not exist,
and `PerSampleClipper` refuses such models. Dropout and drop-path are per-example and fine, outside
the modules the generic engine takes.
"""
from .clipper import PerSampleClipper, check_examples_independent, check_supported_modules
from .loop import PerSampleAGC, per_sample_agc
from .loss_scale import LossGradScale, loss_reduction
from .tuning import TUNING, Tuning, tuned

__all__ = ["LossGradScale", "PerSampleAGC", "PerSampleClipper", "TUNING", "Tuning", "check_examples_independent",
           "check_supported_modules", "loss_reduction", "per_sample_agc", "tuned"]
