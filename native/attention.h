// Multi-head scaled dot-product attention shared by every model port.
#pragma once

#include <ATen/ATen.h>

namespace si {

// q: [B, Nq, H*D], k/v: [B, Nk, H*D] -> [B, Nq, H*D].
// softmax(q kᵀ · D^-0.5 (+ causal mask)) v per head, softmax in the input dtype (SD v1.5 does not
// upcast). libtorch >= 2.0 uses at::scaled_dot_product_attention (flash / memory-efficient
// kernels on CUDA); 1.13 takes the explicit path with bmm (not baddbmm(beta=0): Debian's 1.13
// was seen to leak NaN from its uninitialised input).
at::Tensor multihead_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t heads, bool causal);

}  // namespace si
