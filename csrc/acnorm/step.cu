// A layer's whole forward or backward for one input signature, from its
// StepPlan: the single-pass kernel when the plan has a Resident geometry for
// the pass (and, for 16-byte packs, aligned tensors), else the passes of the
// multi-pass algorithm back to back; either way the Python side makes one
// call per pass.

#include "common.cuh"

namespace acnorm {

cudaError_t launch_step_forward(const StepPlan& plan, const void* x, void* out, float* scratch,
                                const float* gamma_s, const float* beta_s, const float* gamma_t,
                                const float* beta_t, float* running_mean, float* running_var, int* status,
                                cudaStream_t stream) {
  const Resident& fwd = plan.fwd_resident;
  if (fwd.packs > 0 && (!fwd.vector || (is_aligned16(x) && is_aligned16(out)))) {
    const cudaError_t err = launch_resident_forward(plan, x, out, scratch, gamma_s, beta_s, gamma_t, beta_t,
                                                    running_mean, running_var, status, stream);
    if (err != cudaErrorCooperativeLaunchTooLarge) return err;
    // The GPU holds fewer blocks now than its occupancy said when the plan was
    // built (MPS limits, a partitioned GPU): nothing ran, the passes below do.
  }
  const Geometry& geo = plan.geo;
  float* partials = scratch + plan.fwd_partials;
  float* aux = scratch + plan.fwd_aux;
  if (plan.batch_stats) {
    const cudaError_t err = launch_reduce(geo, plan.dtype, x, nullptr, partials, nullptr, plan.activation,
                                          plan.slope, stream);
    if (err != cudaSuccess) return err;
  }
  // In eval the running statistics are the given ones; in training they are
  // read and written by the same thread of the finalise step, so in place.
  FinaliseForwardArgs args{
      plan.batch_stats ? partials : nullptr, geo.num_splits(), x, plan.pilot_stride,
      gamma_s, beta_s, gamma_t, beta_t,
      plan.batch_stats ? nullptr : running_mean, nullptr, plan.batch_stats ? nullptr : running_var,
      running_mean, running_var, scratch + plan.fwd_mean, scratch + plan.fwd_invstd,
      plan.update_running ? running_mean : nullptr, plan.update_running ? running_var : nullptr,
      aux, status, geo.c, plan.count, plan.momentum, plan.eps, plan.temperature};
  cudaError_t err = launch_finalise_forward(args, plan.dtype, stream);
  if (err != cudaSuccess) return err;
  return launch_elementwise(geo, plan.dtype, x, nullptr, out, aux, aux, plan.activation, plan.slope, stream);
}

cudaError_t launch_step_backward(const StepPlan& plan, const void* x, const void* dy, void* dx,
                                 const float* fwd_scratch, float* bwd_scratch, cudaStream_t stream) {
  const Resident& bwd = plan.bwd_resident;
  if (bwd.packs > 0 && (!bwd.vector || (is_aligned16(x) && is_aligned16(dy) && is_aligned16(dx)))) {
    const cudaError_t err = launch_resident_backward(plan, x, dy, dx, fwd_scratch, bwd_scratch, stream);
    if (err != cudaErrorCooperativeLaunchTooLarge) return err;  // as in the forward
  }
  const Geometry& geo = plan.geo;
  const float* aux = fwd_scratch + plan.fwd_aux;
  float* partials = bwd_scratch + plan.bwd_partials;
  float* grad_affine = bwd_scratch + plan.bwd_grad_affine;
  float* coef = bwd_scratch + plan.bwd_coef;
  cudaError_t err = launch_reduce(geo, plan.dtype, x, dy, partials, aux, plan.activation, plan.slope, stream);
  if (err != cudaSuccess) return err;
  err = launch_finalise_backward(partials, geo.num_splits(), nullptr, fwd_scratch + plan.fwd_invstd, aux,
                                 grad_affine, coef, geo.c, plan.count, plan.batch_stats, stream);
  if (err != cudaSuccess) return err;
  err = launch_target_grad(aux, grad_affine, bwd_scratch + plan.bwd_grad_target, geo.c, plan.temperature, stream);
  if (err != cudaSuccess) return err;
  return launch_elementwise(geo, plan.dtype, x, dy, dx, aux, coef, plan.activation, plan.slope, stream);
}

}  // namespace acnorm
