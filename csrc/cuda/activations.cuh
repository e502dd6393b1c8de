// The FFN activations and their exact derivatives, in float32; the same formulas as
// fastgpt/activations.py (gelu_tanh is GPT-2's gelu_new).
#pragma once

#include "../params.h"

namespace fastgpt::cuda {

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kGeluTanhCubic = 0.044715f;
constexpr float kInvSqrt2 = 0.7071067811865476f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;

__device__ inline float activation_forward(Activation activation, float h) {
  switch (activation) {
    case Activation::kGeluTanh:
      return 0.5f * h * (1.0f + tanhf(kSqrt2OverPi * (h + kGeluTanhCubic * h * h * h)));
    case Activation::kGelu:
      return 0.5f * h * (1.0f + erff(h * kInvSqrt2));
    case Activation::kRelu:
      return h < 0.0f ? 0.0f : h;  // NaN stays NaN, as torch.clamp_min(h, 0) keeps it
    case Activation::kSilu:
    default:
      return h / (1.0f + expf(-h));
  }
}

// act(h) and act'(h) together (the backward epilogue needs both, and they share tanh/erf/exp).
__device__ inline void activation_and_derivative(Activation activation, float h, float& value, float& derivative) {
  switch (activation) {
    case Activation::kGeluTanh: {
      const float t = tanhf(kSqrt2OverPi * (h + kGeluTanhCubic * h * h * h));
      const float d_inner = kSqrt2OverPi * (1.0f + 3.0f * kGeluTanhCubic * h * h);
      value = 0.5f * h * (1.0f + t);
      derivative = 0.5f * (1.0f + t) + 0.5f * h * (1.0f - t * t) * d_inner;
      return;
    }
    case Activation::kGelu: {
      const float cdf = 0.5f * (1.0f + erff(h * kInvSqrt2));
      value = h * cdf;
      derivative = cdf + h * kInvSqrt2Pi * expf(-0.5f * h * h);
      return;
    }
    case Activation::kRelu:
      value = h < 0.0f ? 0.0f : h;
      derivative = h > 0.0f ? 1.0f : 0.0f;
      return;
    case Activation::kSilu:
    default: {
      const float s = 1.0f / (1.0f + expf(-h));
      value = h * s;
      derivative = s * (1.0f + h * (1.0f - s));
      return;
    }
  }
}

}  // namespace fastgpt::cuda
