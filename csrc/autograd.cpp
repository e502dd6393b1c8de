// The autograd of the fastgpt ops: one definition per op, registered under the Autograd key of the
// schemas in csrc/api.cpp, so that the CPU and the CUDA kernels of an op (two implementations of one
// operator) share it.
//
// Each op's Autograd kernel does what torch's generated autograd does for an ATen op:
// - it runs the op below autograd (the dispatcher then picks the CPU, CUDA or Meta kernel by the
//   inputs' device);
// - when an input needs a gradient, it builds the op's backward node: the edges to the inputs, the
//   tensors the backward reads (SavedVariable), and the differentiable outputs' history;
// - the statistics it returns (lse, h, mean, rstd, precomputed gradients) get no history.
// The node's apply calls the op's backward operator.
//
// Why not torch::autograd::Function? It demangles its type name on every backward call and keeps
// generic per-input and per-output bookkeeping. At the tiny shapes of a decode step that costs more
// than the kernels, so forward+backward would stay well above the host time of torch's own ops
// (benchmarks/host_overhead.py --calls-at-tiny-shapes).
//
// torch.compile traces through these kernels like any ATen op's autograd, with the Meta kernels for
// shapes. The backward operators have no autograd of their own: the ops are differentiable once, not
// twice.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/_foreach_mul.h>
#include <ATen/ops/clamp_min.h>
#include <ATen/ops/ne.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "targets.h"

namespace fastgpt {
namespace {

using torch::autograd::collect_next_edges;
using torch::autograd::SavedVariable;
using torch::autograd::set_history;
using torch::autograd::variable_list;
using OptionalTensor = std::optional<at::Tensor>;

// The operator `name` of the fastgpt library with C++ signature `Signature`, looked up once per call site.
template <typename Signature>
c10::TypedOperatorHandle<Signature> fastgpt_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// Calls `op` below autograd: the dispatcher goes straight to its CPU, CUDA or Meta kernel.
template <typename Signature, typename... Args>
auto call_below_autograd(const c10::TypedOperatorHandle<Signature>& op, Args&&... args) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(std::forward<Args>(args)...);
}

// Calls a backward operator from a node's apply. In a plain backward (grad mode off) it goes below
// autograd: the backward operators have no Autograd kernel, and the boxed fallbacks the dispatcher
// runs in its place cost more than a tiny shape's kernel. Under create_graph the fallback runs, and
// warns that these ops are differentiable once.
template <typename Signature, typename... Args>
auto call_backward(const c10::TypedOperatorHandle<Signature>& op, Args&&... args) {
  if (at::GradMode::is_enabled()) return op.call(std::forward<Args>(args)...);
  return call_below_autograd(op, std::forward<Args>(args)...);
}

bool requires_grad(const at::Tensor& t) { return t.requires_grad(); }
bool requires_grad(const OptionalTensor& t) { return t.has_value() && t->requires_grad(); }

// Whether autograd records a call with these inputs. When it does not (inference, or no input needing
// a gradient), the op runs below autograd and nothing else happens.
template <typename... Inputs>
bool records_grad(const Inputs&... inputs) {
  return at::GradMode::is_enabled() && (requires_grad(inputs) || ...);
}

at::Tensor defined_or_empty(const OptionalTensor& t) { return t.has_value() ? *t : at::Tensor(); }

OptionalTensor optional_of(const at::Tensor& t) { return t.defined() ? OptionalTensor(t) : std::nullopt; }

// Whether t's values can be read on the host now: a CPU tensor that is not a tracer's (torch.compile's
// fake and functional tensors carry the Python or Functionalize key and have no data).
bool holds_host_data(const at::Tensor& t) {
  constexpr c10::DispatchKeySet kTracerKeys({c10::DispatchKey::Python, c10::DispatchKey::Functionalize});
  return t.is_cpu() && !t.key_set().has_any(kTracerKeys);
}

// How autograd holds its nodes, as the type of an edge's target: c10::intrusive_ptr in torch 2.13 (this
// machine's), std::shared_ptr in torch 2.11 (the GPU machines').
using NodePointer = decltype(torch::autograd::Edge::function);

// A new backward node of type NodeType, held the way this torch holds nodes.
template <typename NodeType>
auto make_node() {
  if constexpr (std::is_same_v<NodePointer, std::shared_ptr<torch::autograd::Node>>) {
    return std::make_shared<NodeType>();
  } else {
    return c10::make_intrusive<NodeType>();
  }
}

// The base of the ops' backward nodes: a fixed name (torch's default demangles the type's on every
// call), and the release of the node's saved tensors once the backward no longer needs them.
template <const char* kName>
struct OpBackward : torch::autograd::Node {
  std::string name() const override { return kName; }

 protected:
  template <typename... Saved>
  void release(Saved&... saved) {
    std::lock_guard<std::mutex> lock(mutex_);
    (saved.reset_data(), ...);
  }
};

// ---------------------------------------------------------------------------------------------
// Causal attention: the backward recomputes the probabilities from q, k and the saved logsumexp.

using AttentionForward = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                            double);
using AttentionBackward = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                         const at::Tensor&, const at::Tensor&,
                                                                         const at::Tensor&, const at::Tensor&, double);

constexpr char kAttentionBackward[] = "fastgpt::AttentionBackward";

struct AttentionBackwardNode : OpBackward<kAttentionBackward> {
  SavedVariable q, k, v, out, lse;
  double softmax_scale = 0.0;

  void release_variables() override { release(q, k, v, out, lse); }

  variable_list apply(variable_list&& grads) override {
    static const auto op = fastgpt_op<AttentionBackward>("fastgpt::attention_backward");
    const at::Tensor& dout = grads[0];  // (B, H, Tq, D)
    if (!dout.defined()) return variable_list(3);
    auto [dq, dk, dv] = call_backward(op, dout, q.unpack(), k.unpack(), v.unpack(), out.unpack(getptr()),
                                      lse.unpack(), softmax_scale);
    return {dq, dk, dv};
  }
};

std::tuple<at::Tensor, at::Tensor> attention_forward_autograd(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v, double softmax_scale) {
  static const auto op = fastgpt_op<AttentionForward>("fastgpt::attention_forward");
  auto [out, lse] = call_below_autograd(op, q, k, v, softmax_scale);  // (B, H, Tq, D), (B, H, Tq) float32
  if (!records_grad(q, k, v)) return {out, lse};
  auto node = make_node<AttentionBackwardNode>();
  node->set_next_edges(collect_next_edges(q, k, v));
  set_history(out, node);
  node->q = SavedVariable(q, false), node->k = SavedVariable(k, false), node->v = SavedVariable(v, false);
  node->out = SavedVariable(out, true), node->lse = SavedVariable(lse, false);
  node->softmax_scale = softmax_scale;
  return {out, lse};
}

// ---------------------------------------------------------------------------------------------
// FFN: the activations saved are x and the pre-activation h; act(h) is recomputed in the backward.

using FfnForward = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const OptionalTensor&,
                                                      const at::Tensor&, const OptionalTensor&, c10::string_view,
                                                      const OptionalTensor&);
using FfnBackward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::string_view);

constexpr char kFfnBackward[] = "fastgpt::FusedFfnBackward";

struct FfnBackwardNode : OpBackward<kFfnBackward> {
  SavedVariable x, h, fc_weight, proj_weight;
  std::string activation;
  bool has_fc_bias = false, has_proj_bias = false, has_residual = false;

  void release_variables() override { release(x, h, fc_weight, proj_weight); }

  // Gradients for x, fc_weight, fc_bias, proj_weight, proj_bias, residual.
  variable_list apply(variable_list&& grads) override {
    static const auto op = fastgpt_op<FfnBackward>("fastgpt::ffn_backward");
    const at::Tensor& dout = grads[0];  // (..., C_out)
    if (!dout.defined()) return variable_list(6);
    auto [dx, dfc_weight, dfc_bias, dproj_weight, dproj_bias] =
        call_backward(op, dout, x.unpack(), h.unpack(), fc_weight.unpack(), proj_weight.unpack(), activation);
    return {dx,
            dfc_weight,
            has_fc_bias ? dfc_bias : at::Tensor(),
            dproj_weight,
            has_proj_bias ? dproj_bias : at::Tensor(),
            has_residual ? dout : at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> ffn_forward_autograd(const at::Tensor& x, const at::Tensor& fc_weight,
                                                        const OptionalTensor& fc_bias, const at::Tensor& proj_weight,
                                                        const OptionalTensor& proj_bias, c10::string_view activation,
                                                        const OptionalTensor& residual) {
  static const auto op = fastgpt_op<FfnForward>("fastgpt::ffn_forward");
  auto [out, h] = call_below_autograd(op, x, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual);
  if (!records_grad(x, fc_weight, fc_bias, proj_weight, proj_bias, residual)) return {out, h};
  auto node = make_node<FfnBackwardNode>();
  node->set_next_edges(collect_next_edges(x, fc_weight, fc_bias, proj_weight, proj_bias, residual));
  set_history(out, node);
  node->x = SavedVariable(x, false), node->h = SavedVariable(h, false);
  node->fc_weight = SavedVariable(fc_weight, false), node->proj_weight = SavedVariable(proj_weight, false);
  node->activation = std::string(activation);
  node->has_fc_bias = fc_bias.has_value(), node->has_proj_bias = proj_bias.has_value();
  node->has_residual = residual.has_value();
  return {out, h};
}

// ---------------------------------------------------------------------------------------------
// LayerNorm (+ fused residual): the backward reads what was normalised (x, or x + residual) and the
// saved mean and rstd; the gradient reaching x + residual from its other uses is added to dx there.

using LayerNormForward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&, double);
using LayerNormBackward = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const OptionalTensor&,
                                                                         const at::Tensor&, const OptionalTensor&,
                                                                         const at::Tensor&, const at::Tensor&);

constexpr char kLayerNormBackward[] = "fastgpt::LayerNormBackward";

struct LayerNormBackwardNode : OpBackward<kLayerNormBackward> {
  SavedVariable normalized_input, weight, mean, rstd;
  bool has_weight = false, has_bias = false, has_residual = false;

  void release_variables() override { release(normalized_input, weight, mean, rstd); }

  // grads: of out and (with a residual) of x + residual. Gradients for x, weight, bias, residual.
  variable_list apply(variable_list&& grads) override {
    static const auto op = fastgpt_op<LayerNormBackward>("fastgpt::layer_norm_backward");
    at::Tensor dout = grads[0];
    const at::Tensor dresidual_out = has_residual ? grads[1] : at::Tensor();
    if (!dout.defined() && !dresidual_out.defined()) return variable_list(4);
    const at::Tensor input = normalized_input.unpack(getptr());
    if (!dout.defined()) dout = at::zeros_like(input);  // only x + residual was used downstream
    auto [dx, dweight, dbias] = call_backward(op, dout, optional_of(dresidual_out), input,
                                              optional_of(weight.unpack()), mean.unpack(), rstd.unpack());
    return {dx, has_weight ? dweight : at::Tensor(), has_bias ? dbias : at::Tensor(),
            has_residual ? dx : at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_forward_autograd(
    const at::Tensor& x, const OptionalTensor& weight, const OptionalTensor& bias, const OptionalTensor& residual,
    double eps) {
  static const auto op = fastgpt_op<LayerNormForward>("fastgpt::layer_norm_forward");
  auto [out, residual_out, mean, rstd] = call_below_autograd(op, x, weight, bias, residual, eps);
  if (!records_grad(x, weight, bias, residual)) return {out, residual_out, mean, rstd};
  auto node = make_node<LayerNormBackwardNode>();
  node->set_next_edges(collect_next_edges(x, weight, bias, residual));
  set_history(out, node);
  if (residual.has_value()) {
    set_history(residual_out, node);  // without a residual, residual_out is an empty placeholder
    node->normalized_input = SavedVariable(residual_out, true);
  } else {
    node->normalized_input = SavedVariable(x, false);
  }
  node->weight = SavedVariable(defined_or_empty(weight), false);
  node->mean = SavedVariable(mean, false), node->rstd = SavedVariable(rstd, false);
  node->has_weight = weight.has_value(), node->has_bias = bias.has_value();
  node->has_residual = residual.has_value();
  return {out, residual_out, mean, rstd};
}

// ---------------------------------------------------------------------------------------------
// Linear cross-entropy. With 'mean' or 'sum', the forward forms the gradients of the summed loss in
// the same pass over the logits when autograd will need them, and the backward only scales them by
// the upstream gradient (and 1 / kept rows for 'mean'). 'none' needs each row's upstream gradient, so
// its backward runs its own pass.

using CrossEntropyForward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptionalTensor&, int64_t, c10::string_view, bool);
using CrossEntropyBackward = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                            const at::Tensor&, const OptionalTensor&,
                                                                            const at::Tensor&, int64_t);

constexpr char kCrossEntropyBackward[] = "fastgpt::LinearCrossEntropyBackward";

struct CrossEntropyBackwardNode : OpBackward<kCrossEntropyBackward> {
  // With gradients from the forward: dx, dweight, dbias, targets. Otherwise ('none'): x, weight, targets,
  // bias.
  SavedVariable dx, dweight, dbias, x, weight, targets, bias;
  int64_t ignore_index = 0;
  bool grads_in_forward = false, has_bias = false, is_mean = false;

  void release_variables() override { release(dx, dweight, dbias, x, weight, targets, bias); }

  // dloss / the rows 'mean' divides by: those whose target is not ignore_index, at least 1 (none
  // kept: zero gradients, as the reference's, rather than 0 * inf). A 0-d tensor: a Scalar factor
  // would cost ATen a conversion per gradient. Counted on the host for CPU tensors, where ATen's
  // count would cost more than the kernels at a decode step's sizes; on the device otherwise (a GPU's
  // targets are not read on the host, and a tracer's have no values).
  at::Tensor mean_scale(const at::Tensor& dloss) {
    if (!holds_host_data(dloss)) return dloss.div(targets.unpack().ne(ignore_index).sum().clamp_min(1));  // ()
    const int64_t kept = kept_rows(targets.unpack(), ignore_index);
    return at::scalar_tensor(dloss.item<double>() / static_cast<double>(std::max<int64_t>(kept, 1)),
                             dloss.options());  // ()
  }

  // Gradients for x, weight, bias.
  variable_list apply(variable_list&& grads) override {
    static const auto op = fastgpt_op<CrossEntropyBackward>("fastgpt::linear_cross_entropy_backward");
    const at::Tensor& dloss = grads[0];  // () for 'mean'/'sum', targets' shape for 'none'
    if (!dloss.defined()) return variable_list(3);
    if (grads_in_forward) {
      // The forward formed the gradients of the summed loss; one foreach op scales them all. They have
      // no history, so under create_graph this says so, as the fallback does for the other ops.
      if (at::GradMode::is_enabled()) {
        TORCH_WARN("fastgpt::linear_cross_entropy is differentiable once: under create_graph=True its "
                        "gradients carry no second-order history");
      }
      std::vector<at::Tensor> summed_grads = {dx.unpack(), dweight.unpack()};
      if (has_bias) summed_grads.push_back(dbias.unpack());
      std::vector<at::Tensor> scaled = at::_foreach_mul(summed_grads, is_mean ? mean_scale(dloss) : dloss);
      return {scaled[0], scaled[1], has_bias ? scaled[2] : at::Tensor()};
    }
    const at::Tensor row_grad = dloss.to(at::kFloat).contiguous();
    auto [grad_x, grad_weight, grad_bias] = call_backward(op, x.unpack(), weight.unpack(), targets.unpack(),
                                                          optional_of(bias.unpack()), row_grad, ignore_index);
    return {grad_x, grad_weight, has_bias ? grad_bias : at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_forward_autograd(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& targets, const OptionalTensor& bias,
    int64_t ignore_index, c10::string_view reduction, bool compute_grad) {
  static const auto op = fastgpt_op<CrossEntropyForward>("fastgpt::linear_cross_entropy_forward");
  const bool records = records_grad(x, weight, bias);
  // The gradients are formed in the forward pass, where autograd will ask for them ('mean' and 'sum').
  const bool grads_in_forward = compute_grad || (records && reduction != "none");
  auto [loss, dx, dweight, dbias] =
      call_below_autograd(op, x, weight, targets, bias, ignore_index, reduction, grads_in_forward);
  if (!records) return {loss, dx, dweight, dbias};
  auto node = make_node<CrossEntropyBackwardNode>();
  node->set_next_edges(collect_next_edges(x, weight, bias));
  set_history(loss, node);
  if (grads_in_forward) {
    node->dx = SavedVariable(dx, false), node->dweight = SavedVariable(dweight, false);
    node->dbias = SavedVariable(dbias, false);
  } else {
    node->x = SavedVariable(x, false), node->weight = SavedVariable(weight, false);
    node->bias = SavedVariable(defined_or_empty(bias), false);
  }
  node->targets = SavedVariable(targets, false);
  node->ignore_index = ignore_index;
  node->is_mean = reduction == "mean";
  node->grads_in_forward = grads_in_forward;
  node->has_bias = bias.has_value();
  return {loss, dx, dweight, dbias};
}

// ---------------------------------------------------------------------------------------------
// Linear (the weight-streaming kernel for the few rows of a decode step): the backward is two GEMMs
// and a column sum, run by ATen.

using LinearForward = at::Tensor(const at::Tensor&, const at::Tensor&, const OptionalTensor&);

constexpr char kLinearBackward[] = "fastgpt::LinearBackward";

struct LinearBackwardNode : OpBackward<kLinearBackward> {
  SavedVariable x, weight;
  bool has_bias = false;

  void release_variables() override { release(x, weight); }

  // Gradients for x, weight, bias.
  variable_list apply(variable_list&& grads) override {
    const at::Tensor& dout = grads[0];  // (..., N)
    if (!dout.defined()) return variable_list(3);
    const at::Tensor input = x.unpack(), w = weight.unpack();  // (..., K), (N, K)
    const at::Tensor dout_rows = dout.reshape({-1, w.size(0)});  // (M, N)
    at::Tensor dx, dweight, dbias;
    if (should_compute_output(0)) dx = at::matmul(dout, w);                                      // (..., K)
    if (should_compute_output(1)) dweight = at::mm(dout_rows.t(), input.reshape({-1, w.size(1)}));  // (N, K)
    if (has_bias && should_compute_output(2)) dbias = dout_rows.sum(0);                          // (N,)
    return {dx, dweight, dbias};
  }
};

at::Tensor linear_autograd(const at::Tensor& x, const at::Tensor& weight, const OptionalTensor& bias) {
  static const auto op = fastgpt_op<LinearForward>("fastgpt::linear");
  at::Tensor out = call_below_autograd(op, x, weight, bias);
  if (!records_grad(x, weight, bias)) return out;
  auto node = make_node<LinearBackwardNode>();
  node->set_next_edges(collect_next_edges(x, weight, bias));
  set_history(out, node);
  node->x = SavedVariable(x, false), node->weight = SavedVariable(weight, false);
  node->has_bias = bias.has_value();
  return out;
}

}  // namespace
}  // namespace fastgpt

TORCH_LIBRARY_IMPL(fastgpt, Autograd, m) {
  m.impl("attention_forward", &fastgpt::attention_forward_autograd);
  m.impl("ffn_forward", &fastgpt::ffn_forward_autograd);
  m.impl("layer_norm_forward", &fastgpt::layer_norm_forward_autograd);
  m.impl("linear_cross_entropy_forward", &fastgpt::linear_cross_entropy_forward_autograd);
  m.impl("linear", &fastgpt::linear_autograd);
}
