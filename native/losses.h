// The SingleInsert training losses (Wu et al., 2023, "SingleInsert: Inserting New Concepts from a
// Single Image into Text-to-Image Models for Flexible Editing", arXiv:2310.08094, Sec. 3), as free
// functions on latents. Numbered 3–7 in the order the paper's Sec. 3 introduces them (the numbers
// were not checked against the PDF; the formulas are the ones the golden case fixes):
//   eq. 3  x̂ = (x_t − √(1−ᾱ_t)·ε_θ(x_t, t, y)) / √ᾱ_t          the model's x0 prediction
//   eq. 4  L_fg = mean(m ⊙ (x̂[* class] − x0)²)                  foreground reconstruction
//   eq. 5  L_bg = mean((1−m) ⊙ (x̂[* class] − sg(x̂[class]))²)   background kept as the class prompt has it
//   eq. 6  L_sm = mean((x̂_lora[class] − sg(x̂_frozen[class]))²)  stage II semantic loss (language drift)
//   eq. 7  L = L_fg + γ·L_bg (stage I),  L = L_fg + γ·L_bg + η·L_sm (stage II)
// "mean" is over every element of the [B, C, h, w] batch, mask included (the reference does
// `(m * d**2).mean()`); loss_fg_masknorm divides by the mask's area instead.
//
// Shapes: latents [B, C, h, w]; masks [B or 1, 1, h, w] in [0, 1], broadcast over the channels.
// Nothing here detaches implicitly except the sg(·) targets named above; nothing is in place.
#pragma once

#include <ATen/ATen.h>

namespace si {

// γ and η of eq. 7: the paper (and our defaults) weight the terms equally.
constexpr double kDefaultGamma = 1.0;
constexpr double kDefaultEta = 1.0;

// eq. 3. x_t, eps: [B, C, h, w]; alphas_cumprod_t: [B] (ᾱ at each element's timestep), any float
// dtype (cast to x_t's). Differentiable in x_t and eps.
at::Tensor predict_x0(const at::Tensor& x_t, const at::Tensor& eps, const at::Tensor& alphas_cumprod_t);

// The mask at latent resolution: F.interpolate(mask, size=(h, w), mode="nearest"). PyTorch's
// "nearest" reads source pixel floor(i · in / out) (0, 8, 16, … for 512 -> 64), not pixel centres.
// mask: [H, W] or [N, 1, H, W] -> [N (1 for 2-D input), 1, h, w], float.
at::Tensor latent_mask_nearest(const at::Tensor& mask, int64_t h, int64_t w);

// eq. 4: mean(m · (x0_pred − x0)²) over all B·C·h·w elements.
at::Tensor loss_fg(const at::Tensor& x0_pred, const at::Tensor& x0, const at::Tensor& mask);

// eq. 4 normalised by the foreground area: sum(m · (x0_pred − x0)²) / sum(m broadcast to [B, C, h, w]),
// so the loss scale does not depend on how much of the image the subject fills. Throws on an empty mask.
at::Tensor loss_fg_masknorm(const at::Tensor& x0_pred, const at::Tensor& x0, const at::Tensor& mask);

// eq. 5: mean((1 − m) · (x0_pred − sg(target))²); `target` is detached here.
at::Tensor loss_bg(const at::Tensor& x0_pred, const at::Tensor& target, const at::Tensor& mask);

// eq. 6: mean((x0_pred_lora − sg(x0_pred_frozen))²); the frozen prediction is detached here.
at::Tensor loss_sm(const at::Tensor& x0_pred_lora, const at::Tensor& x0_pred_frozen);

}  // namespace si
