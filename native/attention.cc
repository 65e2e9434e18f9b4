#include "attention.h"

#include <torch/version.h>

#include <cmath>

namespace si {

at::Tensor multihead_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t heads, bool causal) {
  const int64_t B = q.size(0), Nq = q.size(1), C = q.size(2), Nk = k.size(1);
  TORCH_CHECK(C % heads == 0, "attention: ", C, " channels do not split into ", heads, " heads");
  const int64_t D = C / heads;
  // [B, N, H*D] -> [B, H, N, D]
  auto split = [&](const at::Tensor& x, int64_t n) { return x.reshape({B, n, heads, D}).transpose(1, 2); };
  at::Tensor qh = split(q, Nq), kh = split(k, Nk), vh = split(v, Nk);
  at::Tensor out;
#if TORCH_VERSION_MAJOR >= 2
  out = at::scaled_dot_product_attention(qh, kh, vh, /*attn_mask=*/{}, /*dropout_p=*/0.0, /*is_causal=*/causal);
#else
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  at::Tensor scores = at::matmul(qh, kh.transpose(-1, -2)) * scale;  // [B, H, Nq, Nk]
  if (causal) {
    // CLIP's mask: position i sees j <= i (transformers fills with finfo.min; -inf gives the same softmax)
    at::Tensor mask = at::ones({Nq, Nk}, q.options().dtype(at::kBool)).triu(1);
    scores = scores.masked_fill(mask, -std::numeric_limits<float>::infinity());
  }
  out = at::matmul(at::softmax(scores, -1), vh);  // [B, H, Nq, D]
#endif
  return out.transpose(1, 2).reshape({B, Nq, C});
}

}  // namespace si
