// SingleInsert losses (see losses.h for the equations).
#include "losses.h"

#include <c10/util/Exception.h>

#include <vector>

namespace si {

namespace {

// ᾱ_t [B] -> [B, 1, 1, 1] (as many ones as x has trailing dims), in x's dtype and device.
at::Tensor per_sample(const at::Tensor& alphas_cumprod_t, const at::Tensor& x) {
  TORCH_CHECK(alphas_cumprod_t.dim() == 1 && alphas_cumprod_t.size(0) == x.size(0), "expected one alphas_cumprod value per batch element (",
              x.size(0), "), got ", alphas_cumprod_t.sizes());
  std::vector<int64_t> shape(static_cast<size_t>(x.dim()), 1);
  shape[0] = x.size(0);
  return alphas_cumprod_t.to(x.device(), x.scalar_type()).reshape(shape);
}

void check_pair(const at::Tensor& a, const at::Tensor& b, const char* what) {
  TORCH_CHECK(a.dim() == 4 && a.sizes() == b.sizes(), what, ": expected two [B, C, h, w] latents of the same shape, got ", a.sizes(), " and ",
              b.sizes());
}

void check_mask(const at::Tensor& mask, const at::Tensor& x, const char* what) {
  TORCH_CHECK(mask.dim() == 4 && mask.size(1) == 1 && (mask.size(0) == 1 || mask.size(0) == x.size(0)) && mask.size(2) == x.size(2) &&
                  mask.size(3) == x.size(3),
              what, ": expected a mask [1 or ", x.size(0), ", 1, ", x.size(2), ", ", x.size(3), "], got ", mask.sizes());
}

}  // namespace

at::Tensor predict_x0(const at::Tensor& x_t, const at::Tensor& eps, const at::Tensor& alphas_cumprod_t) {
  check_pair(x_t, eps, "predict_x0");
  // x̂ = (x_t − √(1−ᾱ)·ε) / √ᾱ, in the order of DDPMScheduler.step's "pred_original_sample"
  at::Tensor ab = per_sample(alphas_cumprod_t, x_t);
  return (x_t - (1 - ab).sqrt() * eps) / ab.sqrt();
}

at::Tensor latent_mask_nearest(const at::Tensor& mask, int64_t h, int64_t w) {
  TORCH_CHECK(mask.dim() == 2 || (mask.dim() == 4 && mask.size(1) == 1), "latent_mask_nearest: expected a mask [H, W] or [N, 1, H, W], got ",
              mask.sizes());
  at::Tensor m = mask.dim() == 2 ? mask.unsqueeze(0).unsqueeze(0) : mask;
  // F.interpolate(mode="nearest") with an explicit size calls upsample_nearest2d without scales:
  // source index = floor(dst_index * in / out)
  return at::upsample_nearest2d(m.to(at::kFloat), {h, w});
}

at::Tensor loss_fg(const at::Tensor& x0_pred, const at::Tensor& x0, const at::Tensor& mask) {
  check_pair(x0_pred, x0, "loss_fg");
  check_mask(mask, x0_pred, "loss_fg");
  return (mask * (x0_pred - x0).pow(2)).mean();
}

at::Tensor loss_fg_masknorm(const at::Tensor& x0_pred, const at::Tensor& x0, const at::Tensor& mask) {
  check_pair(x0_pred, x0, "loss_fg_masknorm");
  check_mask(mask, x0_pred, "loss_fg_masknorm");
  at::Tensor area = mask.expand_as(x0_pred).sum();
  TORCH_CHECK(area.item<double>() > 0, "loss_fg_masknorm: the mask is empty (no foreground at latent resolution)");
  return (mask * (x0_pred - x0).pow(2)).sum() / area;
}

at::Tensor loss_bg(const at::Tensor& x0_pred, const at::Tensor& target, const at::Tensor& mask) {
  check_pair(x0_pred, target, "loss_bg");
  check_mask(mask, x0_pred, "loss_bg");
  return ((1 - mask) * (x0_pred - target.detach()).pow(2)).mean();
}

at::Tensor loss_sm(const at::Tensor& x0_pred_lora, const at::Tensor& x0_pred_frozen) {
  check_pair(x0_pred_lora, x0_pred_frozen, "loss_sm");
  return (x0_pred_lora - x0_pred_frozen.detach()).pow(2).mean();
}

}  // namespace si
