// hgkernels._native: the one way into the kernels. It registers operators in torch's dispatcher under
// the `hgkernels` namespace (torch.ops.hgkernels.*), each with the kernels of its devices and an
// autograd rule:
//
//   head_stats, per_sample_backward   the two primitives of hgk_kernels.h; CPU and CUDA kernels, shape
//                                     functions in Python (native.py), head_stats differentiable.
//   plan_forward, plan_backward       the CPU penalty plans of hgk_plans.h, one call per direction.
//   penalty                           plan_forward with plan_backward as its autograd node: the backward
//                                     runs in C++ inside autograd's engine, with no Python in either
//                                     direction but the call itself.
//   penalty_create_graph              the differentiable backward of `penalty` (create_graph=True), which
//                                     native.py implements with torch ops; the node calls it.
//
// Tensors become the kernels' Head and Segments in one place (`Problem`). No math lives here, only
// routing. Built against the installed torch (its C++ ABI), so it refuses to load under another.
#include <torch/extension.h>
#include <torch/library.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <array>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "hgk_kernels.h"
#include "hgk_plans.h"
#include "hgk_tuning.h"

namespace {

using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;
using OptionalTensor = std::optional<at::Tensor>;
using TensorPair = std::tuple<at::Tensor, at::Tensor>;
using TensorTriple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

int loss_code(c10::string_view loss) {
  if (loss == "cross_entropy") return hgk::CROSS_ENTROPY;
  if (loss == "binary_cross_entropy") return hgk::BINARY_CROSS_ENTROPY;
  if (loss == "mse") return hgk::MSE;
  TORCH_CHECK(false, "hgkernels: loss must be cross_entropy, binary_cross_entropy or mse, got ", loss);
}

hgk::PlanSpec plan_spec(c10::string_view method, double weight, bool pooled, bool detach_reference) {
  TORCH_CHECK(method == "exact" || method == "hgp" || method == "fishr",
              "hgkernels: plan method must be exact, hgp or fishr, got ", method);
  return {method == "exact" ? hgk::EXACT_DIAG : method == "hgp" ? hgk::HGP : hgk::FISHR, weight, pooled,
          detach_reference};
}

// One problem's tensors as the kernels read them: logits (N, C) any strides, features (N, D) with unit
// column stride, both of one float dtype; targets contiguous (int64 class ids for cross_entropy, else
// (N, C) floats); order, offsets (E + 1) and env_ids int64 and contiguous; all on one device.
// native.py lays them out so; the constructor checks it, since the kernels read raw memory.
struct Problem {
  const at::Tensor &logits, &features, &targets, &order, &offsets, &env_ids;
  int loss;
  bool bias;

  Problem(const at::Tensor& logits_, const at::Tensor& features_, const at::Tensor& targets_, const at::Tensor& order_,
          const at::Tensor& offsets_, const at::Tensor& env_ids_, c10::string_view loss_, bool bias_)
      : logits(logits_), features(features_), targets(targets_), order(order_), offsets(offsets_), env_ids(env_ids_),
        loss(loss_code(loss_)), bias(bias_) {
    const auto device = logits.device();
    const auto dtype = logits.scalar_type();
    const auto ids = [&](const at::Tensor& t) {
      return t.scalar_type() == at::kLong && t.dim() == 1 && t.is_contiguous() && t.device() == device;
    };
    const bool ce = loss == hgk::CROSS_ENTROPY;
    TORCH_CHECK((dtype == at::kFloat || dtype == at::kDouble) && logits.dim() == 2 && features.dim() == 2 &&
                    features.scalar_type() == dtype && features.device() == device &&
                    features.size(0) == logits.size(0) && (features.stride(1) == 1 || features.size(1) <= 1) &&
                    targets.is_contiguous() && targets.device() == device &&
                    targets.scalar_type() == (ce ? at::kLong : dtype) && targets.size(0) == logits.size(0) &&
                    (ce ? targets.dim() == 1 : targets.dim() == 2 && targets.size(1) == logits.size(1)) &&
                    ids(order) && ids(offsets) && ids(env_ids) && order.size(0) == logits.size(0) &&
                    env_ids.size(0) == logits.size(0) && offsets.size(0) >= 2,
                "hgkernels: tensors outside the layout the kernels read (an internal error)");
  }

  int64_t num_samples() const { return logits.size(0); }
  int num_envs() const { return int(offsets.size(0) - 1); }
  int num_classes() const { return int(logits.size(1)); }
  int head_width() const { return int(features.size(1)) + (bias ? 1 : 0); }
  at::TensorOptions options() const { return logits.options().requires_grad(false); }
  at::Tensor empty(at::IntArrayRef sizes) const { return at::empty(sizes, options()); }

  template <typename T>
  hgk::Head<T> head() const {
    const bool ce = loss == hgk::CROSS_ENTROPY;
    return {logits.data_ptr<T>(),
            logits.stride(0),
            logits.stride(1),
            features.data_ptr<T>(),
            features.stride(0),
            ce ? targets.data_ptr<int64_t>() : nullptr,
            ce ? nullptr : targets.data_ptr<T>(),
            loss,
            num_classes(),
            int(features.size(1)),
            bias};
  }
  hgk::Segments segments() const {
    return {order.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), num_samples(), num_envs(),
            env_ids.data_ptr<int64_t>()};
  }
  // CPU: torch's intra-op thread count; CUDA: the current stream of the tensors' device.
  hgk::Launch launch() const {
    if (logits.is_cuda()) {
      const auto stream = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(logits.device());
      return {1, reinterpret_cast<uintptr_t>(stream.native_handle())};
    }
    return {at::get_num_threads(), 0};
  }
  // A per-environment matrix argument (E, rows, Dh) as the kernels read it: contiguous, the problem's dtype.
  template <typename T>
  const T* matrix(const OptionalTensor& m) const {
    if (!m.has_value()) return nullptr;
    TORCH_CHECK(m->is_contiguous() && m->scalar_type() == logits.scalar_type() && m->device() == logits.device() &&
                    m->dim() == 3 && m->size(0) == num_envs() && m->size(2) == head_width(),
                "hgkernels: a per-environment matrix outside the layout the kernels read (an internal error)");
    return m->data_ptr<T>();
  }
  // A fused linear head (CPU): weight (C, Dh) and the extra logit gradient (N, C), both contiguous.
  template <typename T>
  hgk::HeadTerm<T> head_term(const OptionalTensor& weight, const OptionalTensor& extra, at::Tensor& weight_grad) const {
    if (!weight.has_value()) return {nullptr, nullptr, nullptr};
    TORCH_CHECK(extra.has_value() && weight->is_contiguous() && extra->is_contiguous() &&
                    weight->scalar_type() == logits.scalar_type() && extra->scalar_type() == logits.scalar_type() &&
                    weight->sizes() == at::IntArrayRef({num_classes(), head_width()}) &&
                    extra->sizes() == logits.sizes(),
                "hgkernels: a fused head outside the layout the kernels read (an internal error)");
    weight_grad = empty({num_classes(), head_width()});
    return {weight->data_ptr<T>(), extra->data_ptr<T>(), weight_grad.data_ptr<T>()};
  }
};

// fn(tag) with T = decltype(tag), the problem's float type.
template <typename Fn>
void with_type(const at::Tensor& logits, Fn&& fn) {
  if (logits.scalar_type() == at::kDouble)
    fn(double());
  else
    fn(float());
}

// The kernels of one device, for the templates below.
struct CpuKernels {
  template <typename T, typename... Args>
  static void head_stats(Args&&... args) {
    hgk::cpu::head_stats<T>(std::forward<Args>(args)...);
  }
  template <typename T, typename... Args>
  static bool per_sample_backward(Args&&... args) {
    return hgk::cpu::per_sample_backward<T>(std::forward<Args>(args)...);
  }
};
#ifdef HGK_CUDA
struct CudaKernels {
  template <typename T, typename... Args>
  static void head_stats(Args&&... args) {
    hgk::cuda::head_stats<T>(std::forward<Args>(args)...);
  }
  template <typename T, typename... Args>
  static bool per_sample_backward(Args&&... args) {
    return hgk::cuda::per_sample_backward<T>(std::forward<Args>(args)...);
  }
};
#endif

// head_stats: (E, W, Dh) rows [G][Dg][H V_k] as requested, dirs (E, K*C, Dh); square_residual: the Dg rows
// weigh zh ⊙ zh by r ⊙ r instead of the curvature (hgk_math.h StatsLayout).
template <typename Kernels>
at::Tensor head_stats(const at::Tensor& logits, const at::Tensor& features, const at::Tensor& targets,
                      const at::Tensor& order, const at::Tensor& offsets, const at::Tensor& env_ids,
                      c10::string_view loss, bool bias, bool square_residual, bool gradient, bool hess_diag,
                      const OptionalTensor& dirs) {
  const Problem p(logits, features, targets, order, offsets, env_ids, loss, bias);
  const c10::DeviceGuard guard(logits.device());
  const int C = p.num_classes();
  const int K = dirs.has_value() ? int(dirs->size(1) / C) : 0;
  const hgk::StatsLayout layout{C, K, gradient, hess_diag, square_residual};
  at::Tensor work = p.empty({p.num_samples() * hgk::stats_work_per_sample(layout)});
  at::Tensor out = p.empty({p.num_envs(), layout.width(), p.head_width()});
  with_type(logits, [&](auto tag) {
    using T = decltype(tag);
    Kernels::template head_stats<T>(p.head<T>(), p.segments(), layout, p.matrix<T>(dirs), work.data_ptr<T>(),
                                    out.data_ptr<T>(), p.launch());
  });
  return out;
}

// per_sample_backward: (d_logits (N, C), d_features (N, D), the fused head's (C, Dh) gradient where the
// kernels formed it, else an empty tensor) from upstream Lam (E, C, Dh), directions V and their upstream U
// (E, K*C, Dh each; given together) and Gam (E, C, Dh).
template <typename Kernels>
TensorTriple per_sample_backward(const at::Tensor& logits, const at::Tensor& features, const at::Tensor& targets,
                                 const at::Tensor& order, const at::Tensor& offsets, const at::Tensor& env_ids,
                                 c10::string_view loss, bool bias, bool square_residual, const OptionalTensor& grad_up,
                                 const OptionalTensor& dirs, const OptionalTensor& ups, const OptionalTensor& diag_up,
                                 const OptionalTensor& head_weight, const OptionalTensor& head_extra) {
  const Problem p(logits, features, targets, order, offsets, env_ids, loss, bias);
  TORCH_CHECK(dirs.has_value() == ups.has_value(), "hgkernels: directions and their upstream come together");
  const c10::DeviceGuard guard(logits.device());
  const int C = p.num_classes();
  const int K = dirs.has_value() ? int(dirs->size(1) / C) : 0;
  const hgk::BackwardLayout layout{C, K, grad_up.has_value(), diag_up.has_value(), square_residual};
  at::Tensor work = p.empty({p.num_samples() * hgk::backward_work_per_sample(layout)});
  at::Tensor d_logits = p.empty({p.num_samples(), C});
  at::Tensor d_features = p.empty({p.num_samples(), features.size(1)});
  at::Tensor weight_grad;
  bool written = false;
  with_type(logits, [&](auto tag) {
    using T = decltype(tag);
    written = Kernels::template per_sample_backward<T>(
        p.head<T>(), p.segments(), layout, p.matrix<T>(grad_up), p.matrix<T>(dirs), p.matrix<T>(ups),
        p.matrix<T>(diag_up), p.head_term<T>(head_weight, head_extra, weight_grad), work.data_ptr<T>(),
        d_logits.data_ptr<T>(), d_features.data_ptr<T>(), p.launch());
  });
  return {d_logits, d_features, written ? weight_grad : p.empty({0})};
}

// plan_forward: (the state plan_backward reads, hessian term, gradient term).
TensorTriple plan_forward(const at::Tensor& logits, const at::Tensor& features, const at::Tensor& targets,
                          const at::Tensor& order, const at::Tensor& offsets, const at::Tensor& env_ids,
                          c10::string_view loss, bool bias, c10::string_view method, double weight, bool pooled,
                          bool detach_reference) {
  const Problem p(logits, features, targets, order, offsets, env_ids, loss, bias);
  TORCH_CHECK(logits.is_cpu(), "hgkernels: the penalty plans run on CPU tensors");
  const hgk::PlanSpec spec = plan_spec(method, weight, pooled, detach_reference);
  at::Tensor state = p.empty({hgk::plan_state_size(spec, p.segments(), p.num_classes(), p.head_width())});
  at::Tensor hessian = p.empty({}), gradient = p.empty({});
  with_type(logits, [&](auto tag) {
    using T = decltype(tag);
    hgk::plan_forward<T>(p.head<T>(), p.segments(), spec, state.data_ptr<T>(), hessian.data_ptr<T>(),
                         gradient.data_ptr<T>(), p.launch());
  });
  return {state, hessian, gradient};
}

// plan_backward: d_logits and d_features of alpha * hessian + beta * gradient from plan_forward's state,
// and the fused head's gradient as in per_sample_backward.
TensorTriple plan_backward(const at::Tensor& logits, const at::Tensor& features, const at::Tensor& targets,
                           const at::Tensor& order, const at::Tensor& offsets, const at::Tensor& env_ids,
                           c10::string_view loss, bool bias, c10::string_view method, double weight, bool pooled,
                           bool detach_reference, const at::Tensor& state, double alpha, double beta,
                           const OptionalTensor& head_weight, const OptionalTensor& head_extra) {
  const Problem p(logits, features, targets, order, offsets, env_ids, loss, bias);
  TORCH_CHECK(logits.is_cpu(), "hgkernels: the penalty plans run on CPU tensors");
  const hgk::PlanSpec spec = plan_spec(method, weight, pooled, detach_reference);
  TORCH_CHECK(state.is_contiguous() && state.scalar_type() == logits.scalar_type() &&
                  state.numel() == hgk::plan_state_size(spec, p.segments(), p.num_classes(), p.head_width()),
              "hgkernels: plan_backward's state is not the one its plan_forward wrote");
  at::Tensor d_logits = p.empty({p.num_samples(), p.num_classes()});
  at::Tensor d_features = p.empty({p.num_samples(), features.size(1)});
  at::Tensor weight_grad;
  bool written = false;
  with_type(logits, [&](auto tag) {
    using T = decltype(tag);
    written = hgk::plan_backward<T>(p.head<T>(), p.segments(), spec, state.data_ptr<T>(), alpha, beta,
                                    p.head_term<T>(head_weight, head_extra, weight_grad), d_logits.data_ptr<T>(),
                                    d_features.data_ptr<T>(), p.launch());
  });
  return {d_logits, d_features, written ? weight_grad : p.empty({0})};
}

// penalty without autograd (inference mode, or below the autograd kernel): plan_forward's two terms.
TensorPair penalty(const at::Tensor& logits, const at::Tensor& features, const at::Tensor& targets,
                   const at::Tensor& order, const at::Tensor& offsets, const at::Tensor& env_ids,
                   c10::string_view loss, bool bias, c10::string_view method, double weight, bool pooled,
                   bool detach_reference) {
  auto [state, hessian, gradient] = plan_forward(logits, features, targets, order, offsets, env_ids, loss, bias,
                                                 method, weight, pooled, detach_reference);
  return {hessian, gradient};
}

// ---------------------------------------------------------------------------------------------------
// Autograd rules.

// The dispatcher's handles of the primitives' operators, for the calls below autograd and inside the
// backward formula (dispatched by device).
const auto& head_stats_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("hgkernels::head_stats", "").typed<decltype(
      head_stats<CpuKernels>)>();
  return op;
}
const auto& per_sample_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("hgkernels::per_sample_backward", "")
                             .typed<decltype(per_sample_backward<CpuKernels>)>();
  return op;
}

// head_stats is differentiable in logits, features and dirs: the per-sample backward with the upstream
// rows [dG][dDg][d(H V_k)], and dV_k = H_e (upstream of H V_k), since H_e is symmetric.
struct HeadStatsFunction : torch::autograd::Function<HeadStatsFunction> {
  static constexpr bool is_traceable = true;  // its backward is dispatcher calls only

  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& logits,
                            const at::Tensor& features, const at::Tensor& targets, const at::Tensor& order,
                            const at::Tensor& offsets, const at::Tensor& env_ids, c10::string_view loss, bool bias,
                            bool square_residual, bool gradient, bool hess_diag, const OptionalTensor& dirs) {
    ctx->save_for_backward({logits, features, targets, order, offsets, env_ids, dirs.value_or(at::Tensor())});
    ctx->saved_data["loss"] = std::string(loss);
    ctx->saved_data["bias"] = bias;
    ctx->saved_data["square_residual"] = square_residual;
    ctx->saved_data["gradient"] = gradient;
    ctx->saved_data["hess_diag"] = hess_diag;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return head_stats_op().call(logits, features, targets, order, offsets, env_ids, loss, bias, square_residual,
                                gradient, hess_diag, dirs);
  }

  static variable_list backward(torch::autograd::AutogradContext* ctx, variable_list upstream_list) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& logits = saved[0];
    const std::string loss = ctx->saved_data["loss"].toStringRef();
    const bool bias = ctx->saved_data["bias"].toBool(), square_residual = ctx->saved_data["square_residual"].toBool();
    const bool gradient = ctx->saved_data["gradient"].toBool(), hess_diag = ctx->saved_data["hess_diag"].toBool();
    const OptionalTensor dirs = saved[6].defined() ? OptionalTensor(saved[6]) : std::nullopt;
    const at::Tensor upstream = upstream_list[0];
    const int64_t C = logits.size(1);
    const int64_t diag_begin = gradient ? C : 0, hvp_begin = diag_begin + (hess_diag ? C : 0);
    const auto rows = [&](bool present, int64_t begin, int64_t end) {
      return present ? OptionalTensor(upstream.slice(1, begin, end).contiguous()) : std::nullopt;
    };
    const OptionalTensor grad_up = rows(gradient, 0, C), diag_up = rows(hess_diag, diag_begin, hvp_begin);
    const OptionalTensor ups = rows(dirs.has_value(), hvp_begin, upstream.size(1));
    auto [d_logits, d_features, unused] =
        per_sample_backward_op().call(logits, saved[1], saved[2], saved[3], saved[4], saved[5], loss, bias,
                                      square_residual, grad_up, dirs, ups, diag_up, std::nullopt, std::nullopt);
    at::Tensor d_dirs;
    if (dirs.has_value() && ctx->needs_input_grad(6)) {  // dirs: the seventh tensor input
      d_dirs = head_stats_op().call(logits, saved[1], saved[2], saved[3], saved[4], saved[5], loss, bias,
                                    square_residual, false, false, ups);
    }
    return {d_logits, d_features, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), d_dirs};
  }
};

at::Tensor head_stats_autograd(const at::Tensor& logits, const at::Tensor& features, const at::Tensor& targets,
                               const at::Tensor& order, const at::Tensor& offsets, const at::Tensor& env_ids,
                               c10::string_view loss, bool bias, bool square_residual, bool gradient, bool hess_diag,
                               const OptionalTensor& dirs) {
  return HeadStatsFunction::apply(logits, features, targets, order, offsets, env_ids, loss, bias, square_residual,
                                  gradient, hess_diag, dirs);
}

// The edge's node pointer type (std::shared_ptr in older torch, c10::intrusive_ptr in newer).
using NodePtr = std::decay_t<decltype(std::declval<torch::autograd::Edge>().function)>;

template <typename N>
NodePtr make_node() {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<Node>>)
    return std::make_shared<N>();
  else
    return c10::make_intrusive<N>();
}

// The plan's arguments other than tensors, as the node keeps them.
struct PlanArgs {
  std::string loss, method;
  bool bias = false;
  double weight = 1;
  bool pooled = false, detach_reference = false;
};

// penalty's backward: plan_backward from the forward's state. Everything it reads is a SavedVariable, as
// in a Python autograd.Function: in-place changes to the inputs, targets or environment ids before
// backward raise, and the state is freed after backward unless retain_graph (a second backward then
// raises). create_graph=True runs penalty_create_graph, the torch closed form, instead.
struct PenaltyBackward : Node {
  // What the backward reads, in Problem's order, then the plan's state.
  static constexpr int kSaved = 7;
  static constexpr const char* kSavedNames[kSaved] = {"logits", "features", "targets", "order", "offsets",
                                                      "env_ids", "state"};
  std::array<SavedVariable, kSaved> saved;
  struct Meta {
    at::ScalarType dtype;
    std::vector<int64_t> sizes;
  };
  std::array<Meta, kSaved> forward_meta;  // the saved tensors' dtypes and shapes at the forward
  PlanArgs args;
  std::mutex mutex;

  std::string name() const override { return "HessianAlignmentPenaltyBackward"; }

  // Compiled autograd cannot trace a backward that is one opaque kernel call. hgkernels routes calls
  // made while compiled autograd is on to its Python autograd.Function (native.py `autograd_plan`);
  // this error is for a backward compiled after a forward made without it.
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs&) const override {
    TORCH_CHECK_NOT_IMPLEMENTED(false,
                                "hgkernels: this penalty's forward ran as a C++ autograd node, which compiled "
                                "autograd cannot trace; turn compiled autograd on before the penalty's forward "
                                "(hgkernels then uses its Python autograd.Function)");
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex);
    for (SavedVariable& v : saved) v.reset_data();
  }

  // The saved tensors as the kernels read them. Saved-tensor hooks may hand back other memory: any
  // layout is brought back to the forward's (features: unit column stride, the rest contiguous; logits
  // any strides), and another dtype, shape or device is an error rather than a misread.
  std::array<at::Tensor, kSaved> unpack() {
    std::array<at::Tensor, kSaved> t;
    for (int k = 0; k < kSaved; ++k) {
      t[k] = saved[k].unpack();
      TORCH_CHECK(t[k].device().is_cpu() && t[k].scalar_type() == forward_meta[k].dtype &&
                      t[k].sizes().vec() == forward_meta[k].sizes,
                  "hgkernels: a saved-tensor hook changed the dtype, shape or device of a tensor the penalty's "
                  "backward reads (", kSavedNames[k], ")");
      if (k == 1 ? t[k].stride(1) != 1 : k > 1) t[k] = t[k].contiguous();  // logits: any strides
    }
    return t;
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex);
    const auto t = unpack();
    const PlanArgs& a = args;
    if (at::GradMode::is_enabled()) {
      const auto zero = [&](const at::Tensor& g) { return g.defined() ? g : at::zeros({}, t[0].options()); };
      static auto op = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("hgkernels::penalty_create_graph", "")
                           .typed<TensorPair(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                             const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                             c10::string_view, bool, c10::string_view, double, bool, bool,
                                             const at::Tensor&, const at::Tensor&)>();
      auto [d_logits, d_features] = op.call(t[0], t[1], t[2], t[3], t[4], t[5], a.loss, a.bias, a.method, a.weight,
                                            a.pooled, a.detach_reference, zero(grads[0]), zero(grads[1]));
      return {d_logits, d_features};
    }
    // upstream 0-dim gradients, or undefined ones (zero); item() resolves lazy negation and zero tensors
    const auto scalar = [](const at::Tensor& g) { return g.defined() ? g.item<double>() : 0.0; };
    auto [d_logits, d_features, unused] =
        plan_backward(t[0], t[1], t[2], t[3], t[4], t[5], a.loss, a.bias, a.method, a.weight, a.pooled,
                      a.detach_reference, t[6], scalar(grads[0]), scalar(grads[1]), std::nullopt, std::nullopt);
    return {task_should_compute_output(0) ? d_logits : at::Tensor(),
            task_should_compute_output(1) ? d_features : at::Tensor()};
  }
};

// (hessian, gradient) 0-dim tensors; with grad mode on and logits or features requiring grad they carry
// a PenaltyBackward node.
TensorPair penalty_autograd(const at::Tensor& logits, const at::Tensor& features, const at::Tensor& targets,
                            const at::Tensor& order, const at::Tensor& offsets, const at::Tensor& env_ids,
                            c10::string_view loss, bool bias, c10::string_view method, double weight, bool pooled,
                            bool detach_reference) {
  // as a Python autograd.Function without jvp does: a silent zero tangent would be a wrong value
  TORCH_CHECK_NOT_IMPLEMENTED(!torch::autograd::isFwGradDefined(logits) && !torch::autograd::isFwGradDefined(features),
                              "hgkernels penalties have no forward-mode AD formula (jvp): logits or features carry "
                              "a forward-mode tangent (torch.autograd.forward_ad)");
  at::Tensor state, hessian, gradient;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::tie(state, hessian, gradient) = plan_forward(logits, features, targets, order, offsets, env_ids, loss, bias,
                                                      method, weight, pooled, detach_reference);
  }
  if (torch::autograd::compute_requires_grad(logits, features)) {
    NodePtr fn = make_node<PenaltyBackward>();
    auto* node = static_cast<PenaltyBackward*>(fn.get());
    node->set_next_edges(torch::autograd::collect_next_edges(logits, features));
    const at::Tensor* to_save[] = {&logits, &features, &targets, &order, &offsets, &env_ids, &state};
    for (int k = 0; k < PenaltyBackward::kSaved; ++k) {
      node->saved[k] = SavedVariable(*to_save[k], false);
      node->forward_meta[k] = {to_save[k]->scalar_type(), to_save[k]->sizes().vec()};
    }
    node->args = {std::string(loss), std::string(method), bias, weight, pooled, detach_reference};
    torch::autograd::set_history(hessian, fn);
    torch::autograd::set_history(gradient, fn);
  }
  return {hessian, gradient};
}

}  // namespace

#define HGK_PROBLEM_SCHEMA \
  "Tensor logits, Tensor features, Tensor targets, Tensor order, Tensor offsets, Tensor env_ids, str loss, bool bias"
#define HGK_PLAN_SCHEMA HGK_PROBLEM_SCHEMA ", str method, float weight, bool pooled, bool detach_reference"

TORCH_LIBRARY(hgkernels, m) {
  m.def("head_stats(" HGK_PROBLEM_SCHEMA
        ", bool square_residual, bool gradient, bool hess_diag, Tensor? dirs) -> Tensor");
  m.def("per_sample_backward(" HGK_PROBLEM_SCHEMA
        ", bool square_residual, Tensor? grad_up, Tensor? dirs, Tensor? ups, Tensor? diag_up, Tensor? head_weight, "
        "Tensor? head_extra) -> (Tensor, Tensor, Tensor)");
  m.def("plan_forward(" HGK_PLAN_SCHEMA ") -> (Tensor, Tensor, Tensor)");
  m.def("plan_backward(" HGK_PLAN_SCHEMA
        ", Tensor state, float alpha, float beta, Tensor? head_weight, Tensor? head_extra) -> (Tensor, Tensor, Tensor)");
  m.def("penalty(" HGK_PLAN_SCHEMA ") -> (Tensor, Tensor)");
  m.def("penalty_create_graph(" HGK_PLAN_SCHEMA ", Tensor alpha, Tensor beta) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(hgkernels, CPU, m) {
  m.impl("head_stats", &head_stats<CpuKernels>);
  m.impl("per_sample_backward", &per_sample_backward<CpuKernels>);
  m.impl("plan_forward", &plan_forward);
  m.impl("plan_backward", &plan_backward);
  m.impl("penalty", &penalty);
}

#ifdef HGK_CUDA
TORCH_LIBRARY_IMPL(hgkernels, CUDA, m) {
  m.impl("head_stats", &head_stats<CudaKernels>);
  m.impl("per_sample_backward", &per_sample_backward<CudaKernels>);
}
#endif

TORCH_LIBRARY_IMPL(hgkernels, Autograd, m) {
  m.impl("head_stats", &head_stats_autograd);
  m.impl("penalty", &penalty_autograd);
  // the others are called inside backward formulas: differentiating them is an error, not a zero
  m.impl("per_sample_backward", torch::autograd::autogradNotImplementedFallback());
  m.impl("plan_forward", torch::autograd::autogradNotImplementedFallback());
  m.impl("plan_backward", torch::autograd::autogradNotImplementedFallback());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hgkernels' kernels as torch operators (torch.ops.hgkernels); csrc/ops.cpp lists them";
  // The torch C++ ABI changes between releases: refuse to load against another torch than the build's.
  const auto installed = py::module_::import("torch").attr("__version__").cast<std::string>();
  if (installed != HGK_TORCH_VERSION)
    throw py::import_error("hgkernels._native was built against torch " HGK_TORCH_VERSION " but torch " + installed +
                           " is installed; reinstall hgkernels to rebuild it");
  m.attr("TORCH_VERSION") = HGK_TORCH_VERSION;
  // (E x C x Dh above which the CPU plans keep no per-environment statistics: the tests size their cases by it)
  m.attr("PLAN_STATE_ELEMENTS") = hgk::kPlanStateElements;
  // (the largest environment Fishr's plan takes in register strips beyond that limit; larger ones take runs)
  m.attr("FISHR_STRIP_ROWS") = hgk::kFishrStripRows;
  m.def("plans_over_pairs",
        [](const at::Tensor& offsets, int64_t num_samples, int64_t num_classes, int64_t head_width) {
          TORCH_CHECK(offsets.is_cpu() && offsets.scalar_type() == at::kLong && offsets.dim() == 1 &&
                          offsets.numel() >= 2 && offsets.is_contiguous(),
                      "hgkernels: plans_over_pairs takes the (E + 1,) int64 CPU offsets of the environments");
          const hgk::Segments s{nullptr, offsets.data_ptr<int64_t>(), num_samples, int(offsets.numel() - 1), nullptr};
          return hgk::plans_over_pairs(s, int(num_classes), int(head_width));
        },
        "Whether the CPU plans take pairs of samples within each environment (csrc/hgk_plans.h)");
  m.attr("HAS_CUDA") =
#ifdef HGK_CUDA
      true;
#else
      false;
#endif
}
