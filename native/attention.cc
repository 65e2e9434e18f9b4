#include "attention.h"

#include <torch/version.h>

#include <cmath>
#include <stdexcept>
#include <string>

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

// ---------------------------------------------------------------- cross-attention recorder

namespace {
thread_local AttentionRecorder* active_recorder = nullptr;
}  // namespace

AttentionRecorder::AttentionRecorder(const at::Tensor& token_index, int64_t height, int64_t width)
    : token_index_(token_index.to(at::kCPU, at::kLong).flatten()), height_(height), width_(width), previous_(active_recorder) {
  if (height <= 0 || width <= 0) throw std::invalid_argument("attention recorder: the latent size must be positive");
  active_recorder = this;
}

AttentionRecorder::~AttentionRecorder() { active_recorder = previous_; }

void AttentionRecorder::record(const at::Tensor& q, const at::Tensor& k, int64_t heads) {
  // q: [B, Nq, H*D], k: [B, Nk, H*D]
  const int64_t B = q.size(0), Nq = q.size(1), C = q.size(2), Nk = k.size(1);
  if (B != token_index_.size(0))
    throw std::invalid_argument("attention recorder: " + std::to_string(token_index_.size(0)) + " token positions for an attention batch of " +
                                std::to_string(B));
  TORCH_CHECK(C % heads == 0, "attention recorder: ", C, " channels do not split into ", heads, " heads");
  const int64_t D = C / heads;
  // 1. the layer's spatial size: the UNet halves the latent with stride-2 convs (padding 1, so
  //    odd sizes round up) until the token count matches
  int64_t h = height_, w = width_;
  while (h * w > Nq && (h > 1 || w > 1)) {
    h = (h + 1) / 2;
    w = (w + 1) / 2;
  }
  if (h * w != Nq)
    throw std::invalid_argument("attention recorder: " + std::to_string(Nq) + " query tokens are no downscaled grid of the " +
                                std::to_string(height_) + "x" + std::to_string(width_) + " latent");
  const int64_t max_index = token_index_.max().item<int64_t>(), min_index = token_index_.min().item<int64_t>();
  if (min_index < 0 || max_index >= Nk)
    throw std::invalid_argument("attention recorder: token position " + std::to_string(min_index < 0 ? min_index : max_index) +
                                " is outside the " + std::to_string(Nk) + " text tokens");
  // 2. probabilities in float32, off the autograd graph: [B, H, Nq, Nk]
  at::Tensor qh = q.detach().to(at::kFloat).reshape({B, Nq, heads, D}).transpose(1, 2);
  at::Tensor kh = k.detach().to(at::kFloat).reshape({B, Nk, heads, D}).transpose(1, 2);
  at::Tensor probs = at::softmax(at::matmul(qh, kh.transpose(-1, -2)) / std::sqrt(static_cast<double>(D)), -1);
  // 3. the recorded key column per batch element, averaged over heads: [B, Nq]
  at::Tensor index = token_index_.to(probs.device()).view({B, 1, 1, 1}).expand({B, heads, Nq, 1});
  at::Tensor column = probs.gather(3, index).squeeze(3).mean(1);
  // 4. to the latent size: [B, 1, h, w] -> [B, height, width]
  at::Tensor map = column.view({B, 1, h, w});
  if (h != height_ || w != width_) map = at::upsample_bilinear2d(map, {height_, width_}, /*align_corners=*/false);
  map = map.squeeze(1);
  sum_ = sum_.defined() ? sum_ + map : map;
  ++calls_;
}

at::Tensor AttentionRecorder::maps() const {
  if (!sum_.defined()) return at::zeros({token_index_.size(0), height_, width_}, at::TensorOptions().dtype(at::kFloat));
  return sum_.to(at::kCPU);
}

void record_cross_attention(const at::Tensor& q, const at::Tensor& k, int64_t heads) {
  if (active_recorder != nullptr) active_recorder->record(q, k, heads);
}

}  // namespace si
