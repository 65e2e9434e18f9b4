// Multi-head scaled dot-product attention shared by every model port.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace si {

// q: [B, Nq, H*D], k/v: [B, Nk, H*D] -> [B, Nq, H*D].
// softmax(q kᵀ · D^-0.5 (+ causal mask)) v per head, softmax in the input dtype (SD v1.5 does not
// upcast). libtorch >= 2.0 uses at::scaled_dot_product_attention (flash / memory-efficient
// kernels on CUDA); 1.13 takes the explicit path with bmm (not baddbmm(beta=0): Debian's 1.13
// was seen to leak NaN from its uninitialised input).
at::Tensor multihead_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t heads, bool causal);

// Records where a text token attends in the UNet's cross-attention layers, for the evaluation's
// default foreground masks (lib/eval: the class word's map, thresholded, masks a generated image).
//
// While one is alive on a thread, every record_cross_attention() call on that thread computes the
// softmax probabilities softmax(q kᵀ · D^-0.5) explicitly (in float32, aside from the attention
// itself, which runs unchanged: recording never alters the output), takes the column of the
// recorded key position for each batch element, averages it over the heads, upsamples the
// [h_l, w_l] map of that layer to the latent size [h, w] (bilinear, align_corners=false) and adds
// it to the running sum. Summed over every cross-attention layer and every denoising step, this
// is the "aggregated attention map" of Prompt-to-Prompt (Hertz et al., 2022, section 3.2) and
// DAAM (Tang et al., 2023) without their normalisation, which lib/eval applies.
// Thread-local on purpose: a generation job runs its UNet calls on one worker thread, and other
// jobs on other threads must not see this one's recorder. Scopes nest (the inner one wins).
class AttentionRecorder {
 public:
  // token_index: [B] int64, the key position to record for each element of the attention batch
  // (under classifier-free guidance the batch is [negative, positive]: 2x the images).
  // height, width: the latent size the maps are upsampled to.
  AttentionRecorder(const at::Tensor& token_index, int64_t height, int64_t width);
  ~AttentionRecorder();
  AttentionRecorder(const AttentionRecorder&) = delete;
  AttentionRecorder& operator=(const AttentionRecorder&) = delete;

  // q: [B, Nq, H*D], k: [B, Nk, H*D] (the to_q / to_k outputs of one cross-attention call)
  void record(const at::Tensor& q, const at::Tensor& k, int64_t heads);
  // [B, height, width] float32 on the CPU: the sum so far (zeros before the first call)
  at::Tensor maps() const;
  // number of cross-attention calls recorded
  int64_t calls() const { return calls_; }

 private:
  at::Tensor token_index_;  // [B] int64 on the CPU
  int64_t height_, width_;
  at::Tensor sum_;          // [B, height, width] float32, on the device of the first call
  int64_t calls_ = 0;
  AttentionRecorder* previous_;
};

// Hands one cross-attention call to this thread's recorder; does nothing (and costs nothing) when
// none is active. q: [B, Nq, H*D], k: [B, Nk, H*D].
void record_cross_attention(const at::Tensor& q, const at::Tensor& k, int64_t heads);

}  // namespace si
