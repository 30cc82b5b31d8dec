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
- `containers`: parameters of container modules (the SkipInit gain of an NF block) are handed to
  the block as a copy per example, so autograd delivers their per-example gradients directly
  (`PerExampleCopy`). They must act elementwise with broadcasting against the batch, as gains and
  layer scales do.
- `generic`: any other layer with parameters goes through torch.func (vmap of vjp) in chunks of
  examples: exact, slower.

On CUDA the host, not the GPU, bounds such a backward pass (a layer's per-sample work is some forty small
kernels), so `graphs` captures each layer's per-sample work in a CUDA graph on its second call and replays it.

`clipper` holds `PerSampleClipper`, which installs them; `loss_scale` finds what the loss's reduction, gradient
accumulation and a grad scaler multiplied each example's gradient by; `clipped_sum` the clipped sum shared by the
engines and the precision they compute in (bfloat16 signals stay bfloat16, norms accumulate in
float32); `tuning` the knobs a benchmark may turn (`TUNING`: scratch budget per device, how k x k
convolutions materialise g_i, the layers' CUDA graphs).

BatchNorm in training mode couples the examples of a batch: per-example gradients do not exist,
and `PerSampleClipper` refuses such models. Dropout and drop-path are per-example and fine.
"""
from .clipper import PerSampleClipper, check_examples_independent, check_supported_modules
from .loss_scale import LossGradScale, loss_reduction
from .tuning import TUNING, Tuning, tuned

__all__ = ["LossGradScale", "PerSampleClipper", "TUNING", "Tuning", "check_examples_independent",
           "check_supported_modules", "loss_reduction", "tuned"]
