// The autograd of the fastgpt ops: one definition per op, registered under the Autograd key of the
// schemas in csrc/api.cpp, so that the CPU and the CUDA kernels of an op (two implementations of one
// operator) share it.
//
// Each op's Autograd kernel is a torch::autograd::Function: its forward calls the op below autograd
// (the dispatcher then picks the CPU, CUDA or Meta kernel by the inputs' device), saves what the
// backward needs and marks the statistics it returns (lse, h, mean, rstd, precomputed gradients) as
// non-differentiable; its backward calls the op's backward operator. Written in C++, a forward+backward
// costs a few microseconds of host time, where a Python autograd.Function costs tens
// (benchmarks/host_overhead.py). torch.compile traces through these kernels like any ATen op's autograd,
// with the Meta kernels for shapes. The backward operators have no autograd of their own: the ops are
// differentiable once, not twice.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/clamp_min.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/ne.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

namespace fastgpt {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptionalTensor = std::optional<at::Tensor>;

// The operator `name` of the fastgpt library with C++ signature `Signature`, looked up once.
template <typename Signature>
c10::TypedOperatorHandle<Signature> fastgpt_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

bool requires_grad(const at::Tensor& t) { return t.requires_grad(); }
bool requires_grad(const OptionalTensor& t) { return t.has_value() && t->requires_grad(); }

// Whether autograd records a call with these inputs. When it does not (inference, or no input needing
// a gradient), the op runs below autograd at once, without a graph node or saved tensors.
template <typename... Inputs>
bool records_grad(const Inputs&... inputs) {
  return at::GradMode::is_enabled() && (requires_grad(inputs) || ...);
}

at::Tensor defined_or_empty(const OptionalTensor& t) { return t.has_value() ? *t : at::Tensor(); }

OptionalTensor optional_of(const at::Tensor& t) { return t.defined() ? OptionalTensor(t) : std::nullopt; }

// The forward operators, called below autograd by their Autograd kernels (looked up once).
using AttentionForward = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                            double);
using FfnForward = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const OptionalTensor&,
                                                      const at::Tensor&, const OptionalTensor&, c10::string_view,
                                                      const OptionalTensor&);
using LayerNormForward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&, double);
using CrossEntropyForward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptionalTensor&, int64_t, c10::string_view, bool);
using LinearForward = at::Tensor(const at::Tensor&, const at::Tensor&, const OptionalTensor&);

const c10::TypedOperatorHandle<AttentionForward>& attention_forward_op() {
  static const auto op = fastgpt_op<AttentionForward>("fastgpt::attention_forward");
  return op;
}

const c10::TypedOperatorHandle<FfnForward>& ffn_forward_op() {
  static const auto op = fastgpt_op<FfnForward>("fastgpt::ffn_forward");
  return op;
}

const c10::TypedOperatorHandle<LayerNormForward>& layer_norm_forward_op() {
  static const auto op = fastgpt_op<LayerNormForward>("fastgpt::layer_norm_forward");
  return op;
}

const c10::TypedOperatorHandle<CrossEntropyForward>& linear_cross_entropy_forward_op() {
  static const auto op = fastgpt_op<CrossEntropyForward>("fastgpt::linear_cross_entropy_forward");
  return op;
}

const c10::TypedOperatorHandle<LinearForward>& linear_op() {
  static const auto op = fastgpt_op<LinearForward>("fastgpt::linear");
  return op;
}

// ---------------------------------------------------------------------------------------------
// Causal attention: the backward recomputes the probabilities from q, k and the saved logsumexp.

class CausalAttention : public torch::autograd::Function<CausalAttention> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               double softmax_scale) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, lse] = attention_forward_op().call(q, k, v, softmax_scale);  // (B, H, Tq, D), (B, H, Tq) float32
    ctx->set_materialize_grads(false);                   // lse gets no gradient: no zero tensor for it
    ctx->mark_non_differentiable({lse});
    ctx->save_for_backward({q, k, v, out, lse});
    ctx->saved_data["softmax_scale"] = softmax_scale;
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        fastgpt_op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                                  const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                                  double)>("fastgpt::attention_backward");
    const at::Tensor& dout = grads[0];
    if (!dout.defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    const variable_list saved = ctx->get_saved_variables();
    auto [dq, dk, dv] = op.call(dout, saved[0], saved[1], saved[2], saved[3], saved[4],
                                ctx->saved_data["softmax_scale"].toDouble());
    return {dq, dk, dv, at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> attention_forward_autograd(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v, double softmax_scale) {
  if (!records_grad(q, k, v)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return attention_forward_op().call(q, k, v, softmax_scale);
  }
  const variable_list outputs = CausalAttention::apply(q, k, v, softmax_scale);
  return {outputs[0], outputs[1]};
}

// ---------------------------------------------------------------------------------------------
// FFN: the activations saved are x and the pre-activation h; act(h) is recomputed in the backward.

class FusedFfn : public torch::autograd::Function<FusedFfn> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& fc_weight,
                               const OptionalTensor& fc_bias, const at::Tensor& proj_weight,
                               const OptionalTensor& proj_bias, const std::string& activation,
                               const OptionalTensor& residual) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, h] = ffn_forward_op().call(x, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual);
    ctx->set_materialize_grads(false);  // h gets no gradient: no (tokens, hidden) zero tensor for it
    ctx->mark_non_differentiable({h});
    ctx->save_for_backward({x, h, fc_weight, proj_weight});
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["has_fc_bias"] = fc_bias.has_value();
    ctx->saved_data["has_proj_bias"] = proj_bias.has_value();
    ctx->saved_data["has_residual"] = residual.has_value();
    return {out, h};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        fastgpt_op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
            const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
            c10::string_view)>("fastgpt::ffn_backward");
    const at::Tensor& dout = grads[0];
    if (!dout.defined()) return variable_list(7);
    const variable_list saved = ctx->get_saved_variables();
    auto [dx, dfc_weight, dfc_bias, dproj_weight, dproj_bias] =
        op.call(dout, saved[0], saved[1], saved[2], saved[3], ctx->saved_data["activation"].toStringRef());
    return {dx,
            dfc_weight,
            ctx->saved_data["has_fc_bias"].toBool() ? dfc_bias : at::Tensor(),
            dproj_weight,
            ctx->saved_data["has_proj_bias"].toBool() ? dproj_bias : at::Tensor(),
            at::Tensor(),
            ctx->saved_data["has_residual"].toBool() ? dout : at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> ffn_forward_autograd(const at::Tensor& x, const at::Tensor& fc_weight,
                                                        const OptionalTensor& fc_bias, const at::Tensor& proj_weight,
                                                        const OptionalTensor& proj_bias, c10::string_view activation,
                                                        const OptionalTensor& residual) {
  if (!records_grad(x, fc_weight, fc_bias, proj_weight, proj_bias, residual)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return ffn_forward_op().call(x, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual);
  }
  const variable_list outputs =
      FusedFfn::apply(x, fc_weight, fc_bias, proj_weight, proj_bias, std::string(activation), residual);
  return {outputs[0], outputs[1]};
}

// ---------------------------------------------------------------------------------------------
// LayerNorm (+ fused residual): the backward reads what was normalised (x, or x + residual) and the
// saved mean and rstd; the gradient reaching x + residual from its other uses is added to dx there.

class LayerNorm : public torch::autograd::Function<LayerNorm> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const OptionalTensor& weight,
                               const OptionalTensor& bias, const OptionalTensor& residual, double eps) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, residual_out, mean, rstd] = layer_norm_forward_op().call(x, weight, bias, residual, eps);
    ctx->set_materialize_grads(false);  // mean, rstd (and an unused x + residual) get no zero tensors
    if (residual.has_value()) {
      ctx->mark_non_differentiable({mean, rstd});
    } else {
      ctx->mark_non_differentiable({residual_out, mean, rstd});  // residual_out: an empty placeholder
    }
    ctx->save_for_backward({residual.has_value() ? residual_out : x, defined_or_empty(weight), mean, rstd});
    ctx->saved_data["has_weight"] = weight.has_value();
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->saved_data["has_residual"] = residual.has_value();
    return {out, residual_out, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = fastgpt_op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const OptionalTensor&, const at::Tensor&, const OptionalTensor&, const at::Tensor&,
        const at::Tensor&)>("fastgpt::layer_norm_backward");
    const bool has_residual = ctx->saved_data["has_residual"].toBool();
    at::Tensor dout = grads[0];
    const at::Tensor dresidual_out = has_residual ? grads[1] : at::Tensor();
    if (!dout.defined() && !dresidual_out.defined()) return variable_list(5);
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& normalized_input = saved[0];
    if (!dout.defined()) dout = at::zeros_like(normalized_input);  // only x + residual was used downstream
    auto [dx, dweight, dbias] =
        op.call(dout, optional_of(dresidual_out), normalized_input, optional_of(saved[1]), saved[2], saved[3]);
    return {dx, ctx->saved_data["has_weight"].toBool() ? dweight : at::Tensor(),
            ctx->saved_data["has_bias"].toBool() ? dbias : at::Tensor(), has_residual ? dx : at::Tensor(),
            at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_forward_autograd(
    const at::Tensor& x, const OptionalTensor& weight, const OptionalTensor& bias, const OptionalTensor& residual,
    double eps) {
  if (!records_grad(x, weight, bias, residual)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return layer_norm_forward_op().call(x, weight, bias, residual, eps);
  }
  const variable_list outputs = LayerNorm::apply(x, weight, bias, residual, eps);
  return {outputs[0], outputs[1], outputs[2], outputs[3]};
}

// ---------------------------------------------------------------------------------------------
// Linear cross-entropy. With 'mean' or 'sum', the forward forms the gradients of the summed loss in
// the same pass over the logits when autograd will need them, and the backward only scales them by
// the upstream gradient. 'none' needs each row's upstream gradient, so its backward runs its own pass.

class LinearCrossEntropy : public torch::autograd::Function<LinearCrossEntropy> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& targets, const OptionalTensor& bias, int64_t ignore_index,
                               const std::string& reduction, bool compute_grad) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, dx, dweight, dbias] = linear_cross_entropy_forward_op().call(x, weight, targets, bias, ignore_index, reduction, compute_grad);
    ctx->set_materialize_grads(false);  // the gradient outputs get no (vocab, channels) zero tensors
    ctx->mark_non_differentiable({dx, dweight, dbias});
    if (compute_grad) {
      ctx->save_for_backward({targets, dx, dweight, dbias});
    } else {
      ctx->save_for_backward({targets, x, weight, defined_or_empty(bias)});
    }
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["compute_grad"] = compute_grad;
    ctx->saved_data["has_bias"] = bias.has_value();
    return {loss, dx, dweight, dbias};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = fastgpt_op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptionalTensor&, const at::Tensor&, int64_t)>(
        "fastgpt::linear_cross_entropy_backward");
    const at::Tensor& dloss = grads[0];
    if (!dloss.defined()) return variable_list(7);
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& targets = saved[0];
    const int64_t ignore_index = ctx->saved_data["ignore_index"].toInt();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    at::Tensor scale = dloss;  // () for 'mean'/'sum', targets' shape for 'none'
    if (ctx->saved_data["reduction"].toStringRef() == "mean") {
      // With no kept row the gradients of sum(loss) are zeros; max(kept, 1) keeps them zeros (as the
      // reference's) instead of 0 * inf = NaN.
      scale = dloss.div(at::ne(targets, ignore_index).sum().clamp_min(1));
    }
    at::Tensor dx, dweight, dbias;
    if (ctx->saved_data["compute_grad"].toBool()) {
      dx = saved[1].mul(scale);
      dweight = saved[2].mul(scale);
      if (has_bias) dbias = saved[3].mul(scale);
    } else {
      const at::Tensor row_grad = scale.expand(targets.sizes()).to(at::kFloat).contiguous();  // (...)
      std::tie(dx, dweight, dbias) = op.call(saved[1], saved[2], targets, optional_of(saved[3]), row_grad, ignore_index);
      if (!has_bias) dbias = at::Tensor();
    }
    return {dx, dweight, at::Tensor(), dbias, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_forward_autograd(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& targets, const OptionalTensor& bias,
    int64_t ignore_index, c10::string_view reduction, bool compute_grad) {
  if (!records_grad(x, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return linear_cross_entropy_forward_op().call(x, weight, targets, bias, ignore_index, reduction, compute_grad);
  }
  // The gradients are formed in the forward pass, where autograd will ask for them ('mean' and 'sum').
  const bool grads_in_forward = compute_grad || reduction != "none";
  const variable_list outputs = LinearCrossEntropy::apply(x, weight, targets, bias, ignore_index,
                                                          std::string(reduction), grads_in_forward);
  return {outputs[0], outputs[1], outputs[2], outputs[3]};
}

// ---------------------------------------------------------------------------------------------
// Linear (the weight-streaming kernel for the few rows of a decode step): the backward is two GEMMs
// and a column sum, run by ATen.

class Linear : public torch::autograd::Function<Linear> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const OptionalTensor& bias) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({x, weight});
    ctx->saved_data["has_bias"] = bias.has_value();
    return {linear_op().call(x, weight, bias)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& dout = grads[0];  // (..., N)
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1];  // (..., K), (N, K)
    const at::Tensor dout_rows = dout.reshape({-1, weight.size(0)});  // (M, N)
    at::Tensor dx, dweight, dbias;
    if (ctx->needs_input_grad(0)) dx = at::matmul(dout, weight);                           // (..., K)
    if (ctx->needs_input_grad(1)) dweight = at::mm(dout_rows.t(), x.reshape({-1, x.size(-1)}));  // (N, K)
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)) dbias = dout_rows.sum(0);  // (N,)
    return {dx, dweight, dbias};
  }
};

at::Tensor linear_autograd(const at::Tensor& x, const at::Tensor& weight, const OptionalTensor& bias) {
  if (!records_grad(x, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return linear_op().call(x, weight, bias);
  }
  return Linear::apply(x, weight, bias)[0];
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
