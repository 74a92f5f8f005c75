// pybind11 module over the kernels of hgk_kernels.h. Compiled once per device, linked
// with cpu_kernels.cpp (hgkernels._native_cpu) or cuda_kernels.cu (hgkernels._native_cuda).
// Tensors cross as raw addresses plus sizes and strides, so the module never touches the
// torch C++ ABI and builds without torch; hgkernels/backends/native.py owns the tensors.
#include <pybind11/pybind11.h>

#include "hgk_kernels.h"
#ifdef HGK_CPU_PLANS
#include "hgk_plans.h"
#endif

#ifndef HGK_MODULE
#error "HGK_MODULE (the Python module name) must be defined by the build"
#endif

namespace py = pybind11;

namespace {

template <typename T>
const T* ptr(uintptr_t address) {
  return reinterpret_cast<const T*>(address);
}

template <typename T>
T* mut(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

// head: (logits, logits row stride, logits col stride, features, features row stride,
//        labels or 0, targets or 0, loss, C, D, bias)
template <typename T>
hgk::Head<T> head_from(const py::tuple& t) {
  return {ptr<T>(t[0].cast<uintptr_t>()), t[1].cast<int64_t>(),  t[2].cast<int64_t>(),
          ptr<T>(t[3].cast<uintptr_t>()), t[4].cast<int64_t>(),  ptr<int64_t>(t[5].cast<uintptr_t>()),
          ptr<T>(t[6].cast<uintptr_t>()), t[7].cast<int>(),      t[8].cast<int>(),
          t[9].cast<int>(),               t[10].cast<bool>()};
}

// segments: (order, offsets, N, E, env_ids)
hgk::Segments segments_from(const py::tuple& t) {
  return {ptr<int64_t>(t[0].cast<uintptr_t>()), ptr<int64_t>(t[1].cast<uintptr_t>()), t[2].cast<int64_t>(),
          t[3].cast<int>(), ptr<int64_t>(t[4].cast<uintptr_t>())};
}

// launch: (threads, stream)
hgk::Launch launch_from(const py::tuple& t) { return {t[0].cast<int>(), t[1].cast<uintptr_t>()}; }

// layout: (C, K, gradient, hess_diag, square_residual)
template <typename Layout>
Layout layout_from(const py::tuple& t) {
  return {t[0].cast<int>(), t[1].cast<int>(), t[2].cast<bool>(), t[3].cast<bool>(), t[4].cast<bool>()};
}

#ifdef HGK_CPU_PLANS
// plan: (method, weight, pooled, detach_reference)
hgk::PlanSpec plan_from(const py::tuple& t) {
  return {t[0].cast<int>(), t[1].cast<double>(), t[2].cast<bool>(), t[3].cast<bool>()};
}
#endif

// fused head: (weight, extra logit gradient, weight gradient) addresses, 0 for none
template <typename T>
hgk::HeadTerm<T> head_term_from(uintptr_t weight, uintptr_t extra, uintptr_t weight_grad) {
  return {ptr<T>(weight), ptr<T>(extra), mut<T>(weight_grad)};
}

// Calls fn(tag, head, segments, launch) for the kernel's scalar type T = decltype(tag) (double when
// is_double, else float): the tuples are read with the GIL held, fn runs without it.
template <typename Fn>
void with_problem(bool is_double, const py::tuple& head, const py::tuple& seg, const py::tuple& launch, Fn&& fn) {
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const auto h = head_from<T>(head);
    const auto s = segments_from(seg);
    const auto l = launch_from(launch);
    py::gil_scoped_release release;
    fn(tag, h, s, l);
  };
  if (is_double)
    run(double());
  else
    run(float());
}

}  // namespace

PYBIND11_MODULE(HGK_MODULE, m) {
  m.doc() = "hgkernels native kernels; csrc/hgk_kernels.h states what each computes";
  m.def("stats_work_per_sample", [](py::tuple layout) {
    return hgk::stats_work_per_sample(layout_from<hgk::StatsLayout>(layout));
  });
  m.def("backward_work_per_sample", [](py::tuple layout) {
    return hgk::backward_work_per_sample(layout_from<hgk::BackwardLayout>(layout));
  });
  m.def("head_stats", [](bool is_double, py::tuple head, py::tuple seg, py::tuple layout, uintptr_t dirs,
                         uintptr_t work, uintptr_t out, py::tuple launch) {
    const auto lay = layout_from<hgk::StatsLayout>(layout);
    with_problem(is_double, head, seg, launch, [&](auto tag, const auto& h, const auto& s, hgk::Launch l) {
      using T = decltype(tag);
      hgk::head_stats<T>(h, s, lay, ptr<T>(dirs), mut<T>(work), mut<T>(out), l);
    });
  });
  m.def("per_sample_backward", [](bool is_double, py::tuple head, py::tuple seg, py::tuple layout, uintptr_t grad_up,
                                  uintptr_t dirs, uintptr_t ups, uintptr_t gam, uintptr_t head_weight,
                                  uintptr_t head_extra, uintptr_t head_weight_grad, uintptr_t work, uintptr_t d_logits,
                                  uintptr_t d_features, py::tuple launch) {
    const auto lay = layout_from<hgk::BackwardLayout>(layout);
    bool weight_grad_written = false;
    with_problem(is_double, head, seg, launch, [&](auto tag, const auto& h, const auto& s, hgk::Launch l) {
      using T = decltype(tag);
      weight_grad_written = hgk::per_sample_backward<T>(
          h, s, lay, ptr<T>(grad_up), ptr<T>(dirs), ptr<T>(ups), ptr<T>(gam),
          head_term_from<T>(head_weight, head_extra, head_weight_grad), mut<T>(work), mut<T>(d_logits),
          mut<T>(d_features), l);
    });
    return weight_grad_written;
  });
#ifdef HGK_CPU_PLANS
  m.def("plan_state_size", [](py::tuple plan, int num_samples, int num_envs, int C, int head_width) {
    return hgk::plan_state_size(plan_from(plan), num_samples, num_envs, C, head_width);
  });
  m.def("plan_forward", [](bool is_double, py::tuple head, py::tuple seg, py::tuple plan, uintptr_t state,
                           uintptr_t hessian, uintptr_t gradient, py::tuple launch) {
    const auto spec = plan_from(plan);
    with_problem(is_double, head, seg, launch, [&](auto tag, const auto& h, const auto& s, hgk::Launch l) {
      using T = decltype(tag);
      hgk::plan_forward<T>(h, s, spec, mut<T>(state), mut<T>(hessian), mut<T>(gradient), l);
    });
  });
  m.def("plan_backward", [](bool is_double, py::tuple head, py::tuple seg, py::tuple plan, uintptr_t state,
                            double alpha, double beta, uintptr_t head_weight, uintptr_t head_extra,
                            uintptr_t head_weight_grad, uintptr_t d_logits, uintptr_t d_features, py::tuple launch) {
    const auto spec = plan_from(plan);
    bool weight_grad_written = false;
    with_problem(is_double, head, seg, launch, [&](auto tag, const auto& h, const auto& s, hgk::Launch l) {
      using T = decltype(tag);
      weight_grad_written = hgk::plan_backward<T>(h, s, spec, ptr<T>(state), alpha, beta,
                                                  head_term_from<T>(head_weight, head_extra, head_weight_grad),
                                                  mut<T>(d_logits), mut<T>(d_features), l);
    });
    return weight_grad_written;
  });
#endif
}