// hgkernels._native_autograd: the CPU plans of hgk_plans.h as one autograd node, for the common
// eager call (float32/float64 CPU tensors, native backend, exact Hutchinson or HGP, feature form).
// The node's backward runs in C++ inside autograd's engine, with no Python in either direction
// but the call itself: at a small head that host path, not arithmetic, is the time (a Python
// autograd.Function and its glue cost several times F.cross_entropy). Only this module uses the
// torch C++ ABI, so it is built against the installed torch and is optional: without it
// (or with a torch other than the one it was built with) hgkernels/_penalty.py's PenaltyFunction
// runs the same C++ plans through hgkernels._native_cpu. No math lives here, only routing.
#include <torch/extension.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>

#include <array>
#include <mutex>
#include <type_traits>
#include <vector>

#include "hgk_plans.h"

namespace py = pybind11;
using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

namespace {

// One problem's tensors as the Python side checked them (see hgkernels/backends/native.py
// `autograd_plan`): logits (N, C) any strides, features (N, D) unit column stride, targets
// contiguous, order/offsets/env_ids int64 contiguous; logits and features of one float dtype.
struct Problem {
  at::Tensor logits, features, targets, order, offsets, env_ids;
  int loss;
  bool bias;

  template <typename T>
  hgk::Head<T> head() const {
    const bool ce = loss == hgk::CROSS_ENTROPY;
    return {logits.data_ptr<T>(),   logits.stride(0),
            logits.stride(1),       features.data_ptr<T>(),
            features.stride(0),     ce ? targets.data_ptr<int64_t>() : nullptr,
            ce ? nullptr : targets.data_ptr<T>(), loss,
            int(logits.size(1)),    int(features.size(1)),
            bias};
  }
  hgk::Segments segments() const {
    return {order.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), logits.size(0), int(offsets.size(0) - 1),
            env_ids.data_ptr<int64_t>()};
  }
  int64_t head_width() const { return features.size(1) + (bias ? 1 : 0); }
};

// fn(tag) with T = decltype(tag), the problem's float type.
template <typename Fn>
void with_type(const at::Tensor& logits, Fn&& fn) {
  if (logits.scalar_type() == at::kDouble)
    fn(double());
  else
    fn(float());
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

// Drops a Python reference from any thread (autograd's engine threads hold no GIL).
void release_python(py::object& obj) {
  if (!obj || !Py_IsInitialized()) {
    obj.release();  // at interpreter exit: leak rather than touch a finalised interpreter
    return;
  }
  py::gil_scoped_acquire gil;
  obj = py::object();
}

// The backward of alpha * hessian + beta * gradient. Everything it reads is a SavedVariable, as in
// the Python Function: in-place changes to the inputs, targets or environment ids before backward
// raise, and the state is freed after backward unless retain_graph (a second backward then raises).
struct PlanBackward : Node {
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
  int loss = 0;
  bool bias = false;
  hgk::PlanSpec spec{};
  // create_graph=True: hgkernels' Python path differentiates the torch closed form instead
  // (_penalty.DOUBLE_BACKWARD_NOTE); called as double_backward(logits, features, targets, alpha, beta).
  py::object double_backward;
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
    // double_backward stays until the node is freed: dropping it here would take the GIL in every backward
  }

  ~PlanBackward() override { release_python(double_backward); }

  // The saved tensors as the kernels read them. Saved-tensor hooks may hand back other memory: any
  // layout is brought back to the forward's (features: unit column stride, the rest contiguous; logits
  // any strides), and another dtype, shape or device is an error rather than a misread.
  Problem unpack_problem(at::Tensor& saved_state) {
    std::array<at::Tensor, kSaved> t;
    for (int k = 0; k < kSaved; ++k) {
      t[k] = saved[k].unpack();
      TORCH_CHECK(t[k].device().is_cpu() && t[k].scalar_type() == forward_meta[k].dtype &&
                      t[k].sizes().vec() == forward_meta[k].sizes,
                  "hgkernels: a saved-tensor hook changed the dtype, shape or device of a tensor the penalty's "
                  "backward reads (", kSavedNames[k], ")");
      if (k == 1 ? t[k].stride(1) != 1 : k > 1) t[k] = t[k].contiguous();  // logits: any strides
    }
    saved_state = t[6];
    return {t[0], t[1], t[2], t[3], t[4], t[5], loss, bias};
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex);
    at::Tensor saved_state;
    Problem p = unpack_problem(saved_state);
    // upstream 0-dim gradients, or undefined ones (zero); item() resolves lazy negation and zero tensors
    const auto scalar = [](const at::Tensor& g) { return g.defined() ? g.item<double>() : 0.0; };
    if (at::GradMode::is_enabled()) {
      py::gil_scoped_acquire gil;
      const auto zero = [&](const at::Tensor& g) { return g.defined() ? g : at::zeros({}, p.logits.options()); };
      auto out = double_backward(p.logits, p.features, p.targets, zero(grads[0]), zero(grads[1]))
                     .cast<std::pair<py::object, py::object>>();
      const auto tensor = [](const py::object& o) { return o.is_none() ? at::Tensor() : o.cast<at::Tensor>(); };
      return {tensor(out.first), tensor(out.second)};
    }
    const double alpha = scalar(grads[0]), beta = scalar(grads[1]);
    at::Tensor d_logits = at::empty_like(p.logits, at::MemoryFormat::Contiguous);
    at::Tensor d_features = at::empty({p.features.size(0), p.features.size(1)}, p.features.options());
    with_type(p.logits, [&](auto tag) {
      using T = decltype(tag);
      hgk::plan_backward<T>(p.head<T>(), p.segments(), spec, saved_state.data_ptr<T>(), alpha, beta,
                            hgk::HeadTerm<T>{nullptr, nullptr, nullptr}, d_logits.data_ptr<T>(),
                            d_features.data_ptr<T>(), hgk::Launch{at::get_num_threads(), 0});
    });
    return {task_should_compute_output(0) ? d_logits : at::Tensor(),
            task_should_compute_output(1) ? d_features : at::Tensor()};
  }
};

// (hessian, gradient) 0-dim tensors; with grad mode on and logits or features requiring grad they
// carry a PlanBackward node.
py::tuple plan_penalty(at::Tensor logits, at::Tensor features, at::Tensor targets, at::Tensor order,
                       at::Tensor offsets, at::Tensor env_ids, int loss, bool bias, int method, double weight,
                       bool pooled, bool detach_reference, py::object double_backward) {
  if (torch::autograd::isFwGradDefined(logits) || torch::autograd::isFwGradDefined(features)) {
    // as a Python autograd.Function without jvp does: a silent zero tangent would be a wrong value
    PyErr_SetString(PyExc_NotImplementedError,
                    "hgkernels penalties have no forward-mode AD formula (jvp): logits or features carry a "
                    "forward-mode tangent (torch.autograd.forward_ad)");
    throw py::error_already_set();
  }
  // What hgkernels/backends/native.py `autograd_plan` guarantees, checked again: the kernels read raw memory.
  const bool is_float = logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble;
  const auto int64_vector = [&](const at::Tensor& t) {
    return t.scalar_type() == at::kLong && t.dim() == 1 && t.is_contiguous() && t.device().is_cpu();
  };
  TORCH_CHECK(is_float && logits.dim() == 2 && logits.device().is_cpu() && features.dim() == 2 &&
                  features.scalar_type() == logits.scalar_type() && features.device().is_cpu() &&
                  features.size(0) == logits.size(0) && features.stride(1) == 1 && targets.is_contiguous() &&
                  targets.device().is_cpu() &&
                  targets.scalar_type() == (loss == hgk::CROSS_ENTROPY ? at::kLong : logits.scalar_type()) &&
                  targets.size(0) == logits.size(0) && int64_vector(order) && int64_vector(offsets) &&
                  int64_vector(env_ids) && order.size(0) == logits.size(0) && env_ids.size(0) == logits.size(0) &&
                  offsets.size(0) >= 2,
              "hgkernels._native_autograd.plan_penalty: tensors outside the layout it reads (an internal error)");
  Problem p{logits, features, targets, order, offsets, env_ids, loss, bias};
  const hgk::PlanSpec spec{method, weight, pooled, detach_reference};
  const int64_t E = offsets.size(0) - 1, C = logits.size(1);
  const auto options = logits.options().requires_grad(false);
  at::Tensor state = at::empty({hgk::plan_state_size(spec, int(logits.size(0)), int(E), int(C), int(p.head_width()))}, options);
  at::Tensor hessian = at::empty({}, options), gradient = at::empty({}, options);
  {
    py::gil_scoped_release release;
    at::NoGradGuard no_grad;
    with_type(logits, [&](auto tag) {
      using T = decltype(tag);
      hgk::plan_forward<T>(p.head<T>(), p.segments(), spec, state.data_ptr<T>(), hessian.data_ptr<T>(),
                           gradient.data_ptr<T>(), hgk::Launch{at::get_num_threads(), 0});
    });
  }
  if (torch::autograd::compute_requires_grad(logits, features)) {
    NodePtr fn = make_node<PlanBackward>();
    auto* node = static_cast<PlanBackward*>(fn.get());
    node->set_next_edges(torch::autograd::collect_next_edges(logits, features));
    const at::Tensor* saved[] = {&logits, &features, &targets, &order, &offsets, &env_ids, &state};
    for (int k = 0; k < PlanBackward::kSaved; ++k) {
      node->saved[k] = SavedVariable(*saved[k], false);
      node->forward_meta[k] = {saved[k]->scalar_type(), saved[k]->sizes().vec()};
    }
    node->loss = loss;
    node->bias = bias;
    node->spec = spec;
    node->double_backward = std::move(double_backward);
    torch::autograd::set_history(hessian, fn);
    torch::autograd::set_history(gradient, fn);
  }
  return py::make_tuple(hessian, gradient);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hgkernels' CPU penalty plans as one C++ autograd node (built against the installed torch)";
  // The torch C++ ABI changes between releases: refuse to load against another torch than the build's.
  const auto installed = py::module_::import("torch").attr("__version__").cast<std::string>();
  if (installed != HGK_TORCH_VERSION)
    throw py::import_error("hgkernels._native_autograd was built against torch " HGK_TORCH_VERSION
                           " but torch " + installed + " is installed; reinstall hgkernels to rebuild it");
  m.attr("TORCH_VERSION") = HGK_TORCH_VERSION;
  m.def("plan_penalty", &plan_penalty);
}
