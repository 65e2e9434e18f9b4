// AutoencoderKL (the Stable Diffusion VAE), ported from diffusers 0.25.1:
//   src/diffusers/models/autoencoder_kl.py   AutoencoderKL, DiagonalGaussianDistribution (vae.py)
//   src/diffusers/models/vae.py              Encoder, Decoder
//   src/diffusers/models/unet_2d_blocks.py   DownEncoderBlock2D, UpDecoderBlock2D, UNetMidBlock2D
//   src/diffusers/models/resnet.py           ResnetBlock2D, Downsample2D, Upsample2D
//   src/diffusers/models/attention_processor.py  Attention + AttnProcessor (the VAE's single-head block)
//
// Module names are the diffusers state-dict keys (`encoder.down_blocks.0.resnets.1.conv1.weight`,
// `decoder.mid_block.attentions.0.to_out.0.bias`, ...). The building blocks live in namespace
// si::vae: the UNet port has blocks with the same diffusers names but other behaviour (time
// embedding, stride-2 padding 1 downsampling), and the two must not collide in one binary.
#pragma once

#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/pimpl.h>

#include <memory>
#include <string>
#include <vector>

#include "layers.h"
#include "model.h"

namespace si {

// The resolved AutoencoderKL config (diffusers' @register_to_config arguments that shape the model).
struct AutoencoderKLConfig {
  int64_t in_channels = 3;
  int64_t out_channels = 3;
  std::vector<int64_t> block_out_channels;  // one entry per down/up block
  int64_t layers_per_block = 1;             // encoder resnets per block; the decoder has one more
  int64_t latent_channels = 4;
  int64_t norm_num_groups = 32;
  double scaling_factor = 0.18215;          // latents fed to the UNet are mean * scaling_factor
};

// Reads and checks the keys listed in vae.cc; throws std::invalid_argument naming the key.
AutoencoderKLConfig vae_config_from_json(const JsonValue& config);

namespace vae {

// diffusers' VAE uses GroupNorm eps 1e-6 everywhere (resnets, attention group_norm, conv_norm_out);
// Encoder/Decoder pass resnet_eps=1e-6 explicitly (vae.py).
constexpr double kNormEps = 1e-6;

// ResnetBlock2D with temb_channels=None (resnet.py): no time_emb_proj, output_scale_factor 1,
// dropout 0, and a 1x1 `conv_shortcut` only when the channel count changes.
class ResnetBlock2DImpl : public torch::nn::Module {
 public:
  ResnetBlock2DImpl(int64_t in_channels, int64_t out_channels, int64_t groups, const at::TensorOptions& opts);
  // x: [B, in, H, W] -> [B, out, H, W]
  at::Tensor forward(const at::Tensor& x);

  GroupNorm norm1{nullptr}, norm2{nullptr};
  Conv2d conv1{nullptr}, conv2{nullptr};
  Conv2d conv_shortcut{nullptr};  // null when in == out
};
TORCH_MODULE(ResnetBlock2D);

// The mid-block self-attention: diffusers' Attention(heads = 1, dim_head = C, bias=True,
// residual_connection=True, norm_num_groups, eps 1e-6, rescale_output_factor 1), run by AttnProcessor
// on a 4-D input (attention_processor.py). q/k/v/out are Linear over the channel dimension.
class AttentionImpl : public torch::nn::Module {
 public:
  AttentionImpl(int64_t channels, int64_t groups, const at::TensorOptions& opts);
  // x: [B, C, H, W] -> [B, C, H, W]
  at::Tensor forward(const at::Tensor& x);

  GroupNorm group_norm{nullptr};
  Linear to_q{nullptr}, to_k{nullptr}, to_v{nullptr};
  torch::nn::ModuleList to_out;  // 0: Linear, 1: Dropout (Weightless)
  Linear to_out_proj{nullptr};   // typed alias of to_out.0
};
TORCH_MODULE(Attention);

// Downsample2D(use_conv=True, padding=0) (resnet.py): pad right and bottom by one, then a 3x3
// stride-2 conv without padding. This differs from the UNet's symmetric padding-1 downsampler.
class Downsample2DImpl : public torch::nn::Module {
 public:
  Downsample2DImpl(int64_t channels, const at::TensorOptions& opts);
  // x: [B, C, H, W] -> [B, C, floor(H/2), floor(W/2)]
  at::Tensor forward(const at::Tensor& x);

  Conv2d conv{nullptr};
};
TORCH_MODULE(Downsample2D);

// Upsample2D(use_conv=True) (resnet.py): nearest-neighbour x2, then a 3x3 conv with padding 1.
class Upsample2DImpl : public torch::nn::Module {
 public:
  Upsample2DImpl(int64_t channels, const at::TensorOptions& opts);
  // x: [B, C, H, W] -> [B, C, 2H, 2W]
  at::Tensor forward(const at::Tensor& x);

  Conv2d conv{nullptr};
};
TORCH_MODULE(Upsample2D);

// DownEncoderBlock2D (unet_2d_blocks.py): `num_layers` resnets, then an optional downsampler.
class DownEncoderBlock2DImpl : public torch::nn::Module {
 public:
  DownEncoderBlock2DImpl(int64_t in_channels, int64_t out_channels, int64_t num_layers, int64_t groups, bool add_downsample,
                         const at::TensorOptions& opts);
  // x: [B, in, H, W] -> [B, out, H/2, W/2] (or [B, out, H, W] without downsampler)
  at::Tensor forward(const at::Tensor& x);

  torch::nn::ModuleList resnets, downsamplers;  // downsamplers is empty in the last block
  std::vector<ResnetBlock2D> resnet_list;
  std::vector<Downsample2D> downsampler_list;
};
TORCH_MODULE(DownEncoderBlock2D);

// UpDecoderBlock2D (unet_2d_blocks.py): `num_layers` resnets, then an optional upsampler.
class UpDecoderBlock2DImpl : public torch::nn::Module {
 public:
  UpDecoderBlock2DImpl(int64_t in_channels, int64_t out_channels, int64_t num_layers, int64_t groups, bool add_upsample,
                       const at::TensorOptions& opts);
  // x: [B, in, H, W] -> [B, out, 2H, 2W] (or [B, out, H, W] without upsampler)
  at::Tensor forward(const at::Tensor& x);

  torch::nn::ModuleList resnets, upsamplers;  // upsamplers is empty in the last block
  std::vector<ResnetBlock2D> resnet_list;
  std::vector<Upsample2D> upsampler_list;
};
TORCH_MODULE(UpDecoderBlock2D);

// UNetMidBlock2D with num_layers=1, temb None, add_attention=True (unet_2d_blocks.py):
// resnets.0 -> attentions.0 -> resnets.1.
class UNetMidBlock2DImpl : public torch::nn::Module {
 public:
  UNetMidBlock2DImpl(int64_t channels, int64_t groups, const at::TensorOptions& opts);
  // x: [B, C, H, W] -> [B, C, H, W]
  at::Tensor forward(const at::Tensor& x);

  torch::nn::ModuleList resnets, attentions;
  std::vector<ResnetBlock2D> resnet_list;
  Attention attention{nullptr};
};
TORCH_MODULE(UNetMidBlock2D);

// Encoder (vae.py) with double_z=True: image -> 2 * latent_channels "moments" channels (before quant_conv).
class EncoderImpl : public torch::nn::Module {
 public:
  EncoderImpl(const AutoencoderKLConfig& cfg, const at::TensorOptions& opts);
  // x: [B, in_channels, H, W] -> [B, 2*latent_channels, H/f, W/f], f = 2^(blocks-1)
  at::Tensor forward(const at::Tensor& x);

  Conv2d conv_in{nullptr};
  torch::nn::ModuleList down_blocks;
  std::vector<DownEncoderBlock2D> down_block_list;
  UNetMidBlock2D mid_block{nullptr};
  GroupNorm conv_norm_out{nullptr};
  Conv2d conv_out{nullptr};
};
TORCH_MODULE(Encoder);

// Decoder (vae.py) with norm_type "group": latent (after post_quant_conv) -> image.
class DecoderImpl : public torch::nn::Module {
 public:
  DecoderImpl(const AutoencoderKLConfig& cfg, const at::TensorOptions& opts);
  // z: [B, latent_channels, h, w] -> [B, out_channels, h*f, w*f]
  at::Tensor forward(const at::Tensor& z);

  Conv2d conv_in{nullptr};
  UNetMidBlock2D mid_block{nullptr};
  torch::nn::ModuleList up_blocks;
  std::vector<UpDecoderBlock2D> up_block_list;
  GroupNorm conv_norm_out{nullptr};
  Conv2d conv_out{nullptr};
};
TORCH_MODULE(Decoder);

}  // namespace vae

// DiagonalGaussianDistribution's fields (vae.py), all [B, latent_channels, h, w].
struct LatentDist {
  at::Tensor mean;
  at::Tensor logvar;  // clamped to [-30, 20]
  at::Tensor std;     // exp(logvar / 2)
};

// moments: [B, 2*latent, h, w] (quant_conv output) -> mean, clamped logvar, std.
LatentDist diagonal_gaussian(const at::Tensor& moments);

// AutoencoderKL (autoencoder_kl.py) without slicing or tiling.
class AutoencoderKLImpl : public torch::nn::Module {
 public:
  AutoencoderKLImpl(const AutoencoderKLConfig& cfg, const at::TensorOptions& opts);

  // x: [B, in_channels, H, W] in [-1, 1] -> latent distribution [B, latent, H/8, W/8] (SD v1.5)
  LatentDist encode(const at::Tensor& x);
  // z: [B, latent, h, w], UNSCALED (the pipeline divides by scaling_factor first) -> [B, out_channels, 8h, 8w]
  at::Tensor decode(const at::Tensor& z);

  AutoencoderKLConfig config;
  double scaling_factor;
  vae::Encoder encoder{nullptr};
  vae::Decoder decoder{nullptr};
  Conv2d quant_conv{nullptr};       // 1x1, 2*latent -> 2*latent
  Conv2d post_quant_conv{nullptr};  // 1x1, latent -> latent
};
TORCH_MODULE(AutoencoderKL);

// The NativeModel behind kind "vae". run() methods:
//   "encode": { sample [B,C,H,W] } -> { latent_mean, latent_std, latent_logvar, latent_mean_scaled,
//             encoder_out, moments }
//   "decode": { latent [B,latent,h,w] (unscaled) } -> { sample, post_quant_conv_out }
class VaeModel : public NativeModel {
 public:
  VaeModel(const AutoencoderKLConfig& cfg, const at::TensorOptions& opts);
  torch::nn::Module& module() override { return *vae; }
  TensorMap run(const std::string& method, const TensorMap& inputs) override;

  AutoencoderKL vae;
};

}  // namespace si
