// The FFN activations in double for the csrc/dev harnesses' CPU references: the formulas of
// fastgpt/activations.py, and each one's name.
#pragma once

#include <cmath>

#include "../params.h"

using fastgpt::Activation;

inline const char* activation_name(Activation a) {
  switch (a) {
    case Activation::kGeluTanh:
      return "gelu_tanh";
    case Activation::kGelu:
      return "gelu";
    case Activation::kRelu:
      return "relu";
    default:
      return "silu";
  }
}

// The formulas of fastgpt/activations.py, in double.
inline double activation(Activation a, double h) {
  switch (a) {
    case Activation::kGeluTanh:
      return 0.5 * h * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (h + 0.044715 * h * h * h)));
    case Activation::kGelu:
      return 0.5 * h * (1.0 + std::erf(h / std::sqrt(2.0)));
    case Activation::kRelu:
      return h > 0.0 ? h : 0.0;
    default:
      return h / (1.0 + std::exp(-h));
  }
}

inline double activation_derivative(Activation a, double h) {
  switch (a) {
    case Activation::kGeluTanh: {
      const double k = std::sqrt(2.0 / M_PI);
      const double t = std::tanh(k * (h + 0.044715 * h * h * h));
      return 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * h * h);
    }
    case Activation::kGelu:
      return 0.5 * (1.0 + std::erf(h / std::sqrt(2.0))) + h * std::exp(-0.5 * h * h) / std::sqrt(2.0 * M_PI);
    case Activation::kRelu:
      return h > 0.0 ? 1.0 : 0.0;
    default: {
      const double s = 1.0 / (1.0 + std::exp(-h));
      return s * (1.0 + h * (1.0 - s));
    }
  }
}
