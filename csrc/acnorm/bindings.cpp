// The Python module acnorm_fused._cuda: the kernels' host entry points, called
// with raw device pointers, sizes, a dtype code, the device index and the CUDA
// stream. It links the CUDA runtime statically and no torch library, so one
// build serves every torch release; torch allocates every buffer on the
// Python side (acnorm_fused/backends/cuda.py).

// Python.h (through pybind11) first: it sets _POSIX_C_SOURCE and _XOPEN_SOURCE,
// which the C library headers must not have defined already.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <iterator>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <cuda_runtime_api.h>

#include "kernels.h"

namespace py = pybind11;

namespace {

constexpr const char* kModule = "acnorm_fused._cuda";

std::vector<int> archs() {
  int buffer[64];
  const int count = acnorm::compiled_archs(buffer, 64);
  return std::vector<int>(buffer, buffer + (count < 64 ? count : 64));
}

std::string arch_list() {
  std::ostringstream out;
  const std::vector<int> all = archs();
  for (size_t i = 0; i < all.size(); ++i) out << (i ? ", " : "") << "sm_" << all[i];
  return out.str();
}

[[noreturn]] void fail(cudaError_t err, const std::string& what) {
  std::ostringstream msg;
  msg << kModule << ": " << what << " failed: " << cudaGetErrorName(err) << " (" << cudaGetErrorString(err) << ")";
  if (err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver)
    msg << "; no usable CUDA GPU on this machine (use backend='torch' or 'triton')";
  if (err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidDeviceFunction ||
      err == cudaErrorUnsupportedPtxVersion)
    msg << "; this build holds kernels for " << arch_list()
        << ": rebuild with ACNORM_CUDA_ARCHS naming this GPU's compute capability";
  throw std::runtime_error(msg.str());
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) fail(err, what);
}

#ifdef ACNORM_EMULATE
// The host emulator runs on CPU memory: there is no device to select.
class DeviceGuard {
 public:
  explicit DeviceGuard(int) {}
};
#else
// Makes `device` current for the launches of one call, and restores the
// caller's device afterwards (torch keeps its own notion of it).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() {
    int current = -1;
    if (cudaGetDevice(&current) == cudaSuccess && current != previous_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};
#endif

template <typename T>
T* ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

acnorm::DType dtype_of(int code) {
  if (code < 0 || code > 2) throw std::invalid_argument(std::string(kModule) + ": dtype code must be 0, 1 or 2");
  return static_cast<acnorm::DType>(code);
}

cudaStream_t stream_of(std::uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

void reduce(const acnorm::Geometry& geo, int dtype, int device, std::uintptr_t stream, std::uintptr_t x,
            std::uintptr_t dy, std::uintptr_t partials, std::uintptr_t aux, int activation, float slope) {
  DeviceGuard guard(device);
  check(acnorm::launch_reduce(geo, dtype_of(dtype), ptr<const void>(x), ptr<const void>(dy),
                              ptr<float>(partials), ptr<const float>(aux), activation, slope, stream_of(stream)),
        "reduction kernel launch");
}

void elementwise(const acnorm::Geometry& geo, int dtype, int device, std::uintptr_t stream, std::uintptr_t x,
                 std::uintptr_t dy, std::uintptr_t out, std::uintptr_t aux, std::uintptr_t coef, int activation,
                 float slope) {
  DeviceGuard guard(device);
  check(acnorm::launch_elementwise(geo, dtype_of(dtype), ptr<const void>(x), ptr<const void>(dy),
                                   ptr<void>(out), ptr<const float>(aux), ptr<const float>(coef), activation,
                                   slope, stream_of(stream)),
        "elementwise kernel launch");
}

void finalise_forward(int dtype, int device, std::uintptr_t stream, std::uintptr_t partials, int64_t num_splits,
                      std::uintptr_t x, int64_t pilot_stride, std::uintptr_t gamma_s, std::uintptr_t beta_s,
                      std::uintptr_t gamma_t, std::uintptr_t beta_t, std::uintptr_t given_centre,
                      std::uintptr_t given_mean_rel, std::uintptr_t given_var, std::uintptr_t running_mean,
                      std::uintptr_t running_var, std::uintptr_t mean, std::uintptr_t invstd,
                      std::uintptr_t new_mean, std::uintptr_t new_var, std::uintptr_t aux, std::uintptr_t status,
                      int64_t channels, float count, float momentum, float eps, float temperature) {
  DeviceGuard guard(device);
  acnorm::FinaliseForwardArgs args{
      ptr<const float>(partials), num_splits, ptr<const void>(x), pilot_stride, ptr<const float>(gamma_s),
      ptr<const float>(beta_s), ptr<const float>(gamma_t), ptr<const float>(beta_t),
      ptr<const float>(given_centre), ptr<const float>(given_mean_rel), ptr<const float>(given_var),
      ptr<const float>(running_mean), ptr<const float>(running_var), ptr<float>(mean), ptr<float>(invstd),
      ptr<float>(new_mean), ptr<float>(new_var), ptr<float>(aux), ptr<int>(status), channels, count, momentum,
      eps, temperature};
  check(acnorm::launch_finalise_forward(args, dtype_of(dtype), stream_of(stream)), "forward finalise launch");
}

void step_forward(const acnorm::StepPlan& plan, int device, std::uintptr_t stream, std::uintptr_t x,
                  std::uintptr_t out, std::uintptr_t scratch, std::uintptr_t gamma_s, std::uintptr_t beta_s,
                  std::uintptr_t gamma_t, std::uintptr_t beta_t, std::uintptr_t running_mean,
                  std::uintptr_t running_var, std::uintptr_t status) {
  DeviceGuard guard(device);
  check(acnorm::launch_step_forward(plan, ptr<const void>(x), ptr<void>(out), ptr<float>(scratch),
                                    ptr<const float>(gamma_s), ptr<const float>(beta_s), ptr<const float>(gamma_t),
                                    ptr<const float>(beta_t), ptr<float>(running_mean), ptr<float>(running_var),
                                    ptr<int>(status), stream_of(stream)),
        "forward step launch");
}

void step_backward(const acnorm::StepPlan& plan, int device, std::uintptr_t stream, std::uintptr_t x,
                   std::uintptr_t dy, std::uintptr_t dx, std::uintptr_t fwd_scratch, std::uintptr_t bwd_scratch) {
  DeviceGuard guard(device);
  check(acnorm::launch_step_backward(plan, ptr<const void>(x), ptr<const void>(dy), ptr<void>(dx),
                                     ptr<const float>(fwd_scratch), ptr<float>(bwd_scratch), stream_of(stream)),
        "backward step launch");
}

void finalise_backward(int device, std::uintptr_t stream, std::uintptr_t partials, int64_t num_splits,
                       std::uintptr_t global_sums, std::uintptr_t invstd, std::uintptr_t aux,
                       std::uintptr_t grad_affine, std::uintptr_t coef, int64_t channels, float count,
                       bool batch_stats) {
  DeviceGuard guard(device);
  check(acnorm::launch_finalise_backward(ptr<const float>(partials), num_splits, ptr<const float>(global_sums),
                                         ptr<const float>(invstd), ptr<const float>(aux), ptr<float>(grad_affine),
                                         ptr<float>(coef), channels, count, batch_stats, stream_of(stream)),
        "backward finalise launch");
}

void target_grad(int device, std::uintptr_t stream, std::uintptr_t aux, std::uintptr_t grad_affine,
                 std::uintptr_t grad_target, int64_t channels, float temperature) {
  DeviceGuard guard(device);
  check(acnorm::launch_target_grad(ptr<const float>(aux), ptr<const float>(grad_affine), ptr<float>(grad_target),
                                   channels, temperature, stream_of(stream)),
        "target gradient launch");
}

int capacity(int dtype, bool planar, int packs, bool vector, bool backward, int device) {
  DeviceGuard guard(device);
  int blocks = 0;
  check(acnorm::resident_capacity(dtype_of(dtype), planar, packs, vector, backward, device, &blocks),
        "single-pass capacity query");
  return blocks;
}

int runtime_version() {
  int version = 0;
  check(cudaRuntimeGetVersion(&version), "cudaRuntimeGetVersion");
  return version;
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "AC-Norm CUDA kernels, called with raw device pointers (see acnorm_fused.backends.cuda).";

  py::class_<acnorm::Geometry>(m, "Geometry", py::module_local(),
                                "The input's layout and the split grid of the reduction passes.")
      .def(py::init([](bool planar, int64_t n, int64_t c, int64_t s, int64_t split_s, int64_t split_n,
                       int64_t s_chunk, int64_t n_chunk, int64_t splits, int64_t r_chunk, int64_t block_c) {
             return acnorm::Geometry{planar, n, c, s, split_s, split_n, s_chunk, n_chunk, splits, r_chunk, block_c};
           }),
           py::kw_only(), py::arg("planar"), py::arg("n"), py::arg("c"), py::arg("s"), py::arg("split_s"),
           py::arg("split_n"), py::arg("s_chunk"), py::arg("n_chunk"), py::arg("splits"), py::arg("r_chunk"),
           py::arg("block_c"))
      .def_property_readonly("num_splits", &acnorm::Geometry::num_splits);

  py::class_<acnorm::Resident>(m, "Resident", py::module_local(),
                               "The single-pass geometry of a pass (packs = 0: the multi-pass kernels).")
      .def(py::init([](int packs, int lanes_c, int64_t tiles, int64_t blocks, bool vector) {
             return acnorm::Resident{packs, lanes_c, tiles, blocks, vector};
           }),
           py::kw_only(), py::arg("packs"), py::arg("lanes_c"), py::arg("tiles"), py::arg("blocks"),
           py::arg("vector"));

  py::class_<acnorm::StepPlan>(m, "StepPlan", py::module_local(),
                               "One layer's step for one input signature (see acnorm_fused.backends.plan).")
      .def(py::init([](const acnorm::Geometry& geo, int dtype, int activation, float slope, float count,
                       float momentum, float eps, float temperature, bool batch_stats, bool update_running,
                       int64_t pilot_stride, int64_t fwd_partials, int64_t fwd_mean, int64_t fwd_invstd,
                       int64_t fwd_aux, int64_t fwd_weight, int64_t bwd_partials, int64_t bwd_grad_affine,
                       int64_t bwd_coef, int64_t bwd_grad_target, const acnorm::Resident& fwd_resident,
                       const acnorm::Resident& bwd_resident) {
             return acnorm::StepPlan{geo, dtype_of(dtype), activation, slope, count, momentum, eps, temperature,
                                     batch_stats, update_running, pilot_stride, fwd_partials, fwd_mean,
                                     fwd_invstd, fwd_aux, fwd_weight, bwd_partials, bwd_grad_affine, bwd_coef,
                                     bwd_grad_target, fwd_resident, bwd_resident};
           }),
           py::kw_only(), py::arg("geometry"), py::arg("dtype"), py::arg("activation"), py::arg("slope"),
           py::arg("count"), py::arg("momentum"), py::arg("eps"), py::arg("temperature"), py::arg("batch_stats"),
           py::arg("update_running"), py::arg("pilot_stride"), py::arg("fwd_partials"), py::arg("fwd_mean"),
           py::arg("fwd_invstd"), py::arg("fwd_aux"), py::arg("fwd_weight"), py::arg("bwd_partials"),
           py::arg("bwd_grad_affine"), py::arg("bwd_coef"), py::arg("bwd_grad_target"), py::arg("fwd_resident"),
           py::arg("bwd_resident"));

  m.def("reduce", &reduce, "Statistics partials (dy = 0) or gradient partials of a batch.", py::arg("geometry"),
        py::arg("dtype"), py::arg("device"), py::arg("stream"), py::arg("x"), py::arg("dy"), py::arg("partials"),
        py::arg("aux"), py::arg("activation"), py::arg("slope"));
  m.def("elementwise", &elementwise, "The forward apply (dy = 0) or the input gradient.", py::arg("geometry"),
        py::arg("dtype"), py::arg("device"), py::arg("stream"), py::arg("x"), py::arg("dy"), py::arg("out"),
        py::arg("aux"), py::arg("coef"), py::arg("activation"), py::arg("slope"));
  m.def("finalise_forward", &finalise_forward,
        "Statistics, running statistics, the rows of S and the effective affine, per channel.", py::arg("dtype"),
        py::arg("device"), py::arg("stream"), py::arg("partials"), py::arg("num_splits"), py::arg("x"),
        py::arg("pilot_stride"), py::arg("gamma_s"), py::arg("beta_s"), py::arg("gamma_t"), py::arg("beta_t"),
        py::arg("given_centre"), py::arg("given_mean_rel"), py::arg("given_var"), py::arg("running_mean"),
        py::arg("running_var"), py::arg("mean"), py::arg("invstd"), py::arg("new_mean"), py::arg("new_var"),
        py::arg("aux"), py::arg("status"), py::arg("channels"), py::arg("count"), py::arg("momentum"),
        py::arg("eps"), py::arg("temperature"));
  // Positional only: a step is two calls of these per layer, and keywords cost time there.
  m.def("step_forward", &step_forward,
        "A plan's forward: the single-pass kernel, or statistics, finalise and apply.");
  m.def("step_backward", &step_backward,
        "A plan's backward: the single-pass kernel, or gradient sums, finalise, (I + S)^T and dx.");
  m.def("resident_capacity", &capacity,
        "Blocks of a single-pass kernel variant the GPU holds at once (occupancy x multiprocessors).",
        py::arg("dtype"), py::arg("planar"), py::arg("packs"), py::arg("vector"), py::arg("backward"),
        py::arg("device"));
  m.def("finalise_backward", &finalise_backward, "dW, dB and the input-gradient coefficients, per channel.",
        py::arg("device"), py::arg("stream"), py::arg("partials"), py::arg("num_splits"), py::arg("global_sums"),
        py::arg("invstd"), py::arg("aux"), py::arg("grad_affine"), py::arg("coef"), py::arg("channels"),
        py::arg("count"), py::arg("batch_stats"));
  m.def("target_grad", &target_grad, "(I + S)^T [dW; dB].", py::arg("device"), py::arg("stream"), py::arg("aux"),
        py::arg("grad_affine"), py::arg("grad_target"), py::arg("channels"), py::arg("temperature"));
  // The numbering both kernel backends share (acnorm_fused/backends/abi.py checks it).
  py::dict dtype_codes, activation_codes;
  dtype_codes["float32"] = static_cast<int>(acnorm::DType::kFloat32);
  dtype_codes["float16"] = static_cast<int>(acnorm::DType::kFloat16);
  dtype_codes["bfloat16"] = static_cast<int>(acnorm::DType::kBFloat16);
  activation_codes[""] = static_cast<int>(acnorm::kNone);
  activation_codes["relu"] = static_cast<int>(acnorm::kRelu);
  activation_codes["leaky_relu"] = static_cast<int>(acnorm::kLeakyRelu);
  m.attr("DTYPE_CODES") = dtype_codes;
  m.attr("ACTIVATION_CODES") = activation_codes;
  m.attr("AUX_ROWS") = static_cast<int>(acnorm::kAuxRows);
  py::dict aux_rows;
  aux_rows["scale"] = static_cast<int>(acnorm::kScale);
  aux_rows["shift_b"] = static_cast<int>(acnorm::kShiftB);
  aux_rows["centre_hi"] = static_cast<int>(acnorm::kCentreHi);
  aux_rows["centre_lo"] = static_cast<int>(acnorm::kCentreLo);
  aux_rows["source_sig"] = static_cast<int>(acnorm::kSourceSig);
  aux_rows["target_sig"] = static_cast<int>(acnorm::kTargetSig);
  aux_rows["row_max"] = static_cast<int>(acnorm::kRowMax);
  aux_rows["row_sum"] = static_cast<int>(acnorm::kRowSum);
  m.attr("AUX_ROW") = aux_rows;
  m.attr("NON_FINITE_BITS") = py::make_tuple(static_cast<int>(acnorm::kSourceWeight),
                                             static_cast<int>(acnorm::kSourceBias),
                                             static_cast<int>(acnorm::kTargetWeight),
                                             static_cast<int>(acnorm::kTargetBias));
  py::tuple packs(std::size(acnorm::kResidentPacks));
  for (size_t i = 0; i < std::size(acnorm::kResidentPacks); ++i) packs[i] = acnorm::kResidentPacks[i];
  m.attr("RESIDENT_PACKS") = packs;
  m.attr("RESIDENT_WARPS") = acnorm::kResidentWarps;
  m.def("compiled_archs", &archs, "The SASS targets of this build, e.g. [80, 90].");
#ifdef ACNORM_EMULATE
  m.attr("emulated") = true;  // kernels run on the CPU, on host pointers
  m.def("emulated_launches", &acnorm::emulated_launches,
        "Kernel launches the host emulator has run in this process.");
  m.def("watch_reads", &acnorm::watch_reads,
        "Count the bytes the kernels read in [address, address + size) from now on.", py::arg("address"),
        py::arg("size"));
  m.def("watched_reads", &acnorm::watched_reads, "Bytes read in the watched range since watch_reads.");
#else
  m.attr("emulated") = false;
#endif
  m.def("runtime_version", &runtime_version, "The CUDA runtime version linked in, e.g. 13000.");
}
