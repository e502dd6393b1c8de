// The class-index targets of the linear cross-entropy, read on the host: shared by its CPU operator
// (api.cpp) and its autograd (autograd.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace fastgpt {

// Rows whose target is not ignore_index: the divisor of 'mean'. targets: a CPU int64 tensor, any shape.
inline int64_t kept_rows(const at::Tensor& targets, int64_t ignore_index) {
  const at::Tensor contiguous = targets.contiguous();
  const int64_t* values = contiguous.const_data_ptr<int64_t>();
  int64_t kept = 0;
  for (int64_t n = 0; n < contiguous.numel(); ++n) kept += values[n] != ignore_index;
  return kept;
}

}  // namespace fastgpt
