// Host-side helpers shared by the launchers: device queries, alignment checks, shared-memory opt-in.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastgpt::cuda {

// Compute capability of the current device as major * 10 + minor (80 for A100, 90 for H100/H200).
inline cudaError_t device_capability(int* capability) {
  int device = 0, major = 0, minor = 0;
  cudaError_t error = cudaGetDevice(&device);
  if (error == cudaSuccess) error = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (error == cudaSuccess) error = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  *capability = major * 10 + minor;
  return error;
}

// The kernels use cp.async, ldmatrix and bfloat16 mma.sync, which need sm_80 or newer.
inline cudaError_t require_sm80() {
  int capability = 0;
  const cudaError_t error = device_capability(&capability);
  if (error != cudaSuccess) return error;
  return capability >= 80 ? cudaSuccess : cudaErrorNoKernelImageForDevice;
}

inline int current_device_sm_count() {
  int device = 0, count = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 1;
  if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) return 1;
  return count > 0 ? count : 1;
}

// Kernels needing more than the default 48 KB of dynamic shared memory must opt in, per device.
template <typename Kernel>
inline cudaError_t allow_shared_memory(Kernel kernel, int bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

}  // namespace fastgpt::cuda
