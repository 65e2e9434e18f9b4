// UNet2DConditionModel of diffusers 0.25.1 (src/diffusers/models/unet_2d_condition.py) with the
// block set of Stable Diffusion v1.x: CrossAttnDownBlock2D, DownBlock2D, UNetMidBlock2DCrossAttn,
// UpBlock2D and CrossAttnUpBlock2D. Every module is registered under its diffusers state-dict
// key, so `named_parameters()` of UNet2DConditionModel is the checkpoint's key set (686 entries
// for SD v1.5).
//
// Training code uses UNet2DConditionModelImpl::forward directly (it is differentiable; nothing in
// it assumes NoGradGuard). make_unet() wraps the same module for the JS handle.
#pragma once

#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/pimpl.h>

#include <string>
#include <vector>

#include "json.h"
#include "layers.h"
#include "model.h"

namespace si {

// diffusers' get_activation(act_fn): the UNet's resnets, time embedding and conv_act share it.
enum class Activation { SiLU, Mish, GELU, ReLU };
Activation parse_activation(const std::string& name);  // "silu" | "swish" | "mish" | "gelu" | "relu"
at::Tensor apply_activation(Activation act, const at::Tensor& x);

// The UNet config as the ports use it: per-block lists already expanded to one entry per block
// (diffusers accepts an int or a list for several keys).
struct UNetConfig {
  int64_t in_channels = 0, out_channels = 0;
  bool center_input_sample = false;
  bool flip_sin_to_cos = true;
  double freq_shift = 0;
  std::vector<std::string> down_block_types, up_block_types;  // same length as block_out_channels
  std::vector<int64_t> block_out_channels;
  std::vector<int64_t> layers_per_block;              // per down block; up blocks have one more
  std::vector<int64_t> num_attention_heads;           // per down block (config: attention_head_dim)
  std::vector<int64_t> cross_attention_dim;           // per down block
  std::vector<int64_t> transformer_layers_per_block;  // per down block
  int64_t downsample_padding = 1;
  double mid_block_scale_factor = 1;
  Activation act_fn = Activation::SiLU;
  int64_t norm_num_groups = 32;
  double norm_eps = 1e-5;
  bool use_linear_projection = false;
  int64_t conv_in_kernel = 3, conv_out_kernel = 3;

  // Reads a diffusers unet/config.json. Throws std::invalid_argument naming the key for a missing
  // key, a mistyped value, or a feature outside the SD v1.x block set.
  static UNetConfig from_json(const JsonValue& cfg);
};

// Timesteps (embeddings.py get_timestep_embedding): timesteps [B] (int or float) -> [B, dim] float32.
at::Tensor timestep_embedding(const at::Tensor& timesteps, int64_t dim, bool flip_sin_to_cos, double downscale_freq_shift);

// embeddings.py TimestepEmbedding without cond_proj / post_act: linear_1 -> act -> linear_2.
class TimestepEmbeddingImpl : public torch::nn::Module {
 public:
  TimestepEmbeddingImpl(int64_t in_channels, int64_t time_embed_dim, Activation act, const at::TensorOptions& opts);
  at::Tensor forward(const at::Tensor& sample);  // [B, in] -> [B, time_embed_dim]

  Linear linear_1{nullptr}, linear_2{nullptr};
  Activation act;
};
TORCH_MODULE(TimestepEmbedding);

// resnet.py ResnetBlock2D with time_embedding_norm "default" (temb added after conv1).
class ResnetBlock2DImpl : public torch::nn::Module {
 public:
  ResnetBlock2DImpl(int64_t in_channels, int64_t out_channels, int64_t temb_channels, int64_t groups, double eps,
                    Activation act, double output_scale_factor, const at::TensorOptions& opts);
  at::Tensor forward(const at::Tensor& x, const at::Tensor& temb);  // x [B, in, H, W], temb [B, T] -> [B, out, H, W]

  GroupNorm norm1{nullptr}, norm2{nullptr};
  Conv2d conv1{nullptr}, conv2{nullptr}, conv_shortcut{nullptr};  // conv_shortcut only when in != out
  Linear time_emb_proj{nullptr};
  Activation act;
  double output_scale_factor;
};
TORCH_MODULE(ResnetBlock2D);

// attention_processor.py Attention with the plain processor: to_q/to_k/to_v without bias,
// to_out.0 with bias (to_out.1 is a Dropout).
class AttentionImpl : public torch::nn::Module {
 public:
  AttentionImpl(int64_t query_dim, int64_t context_dim, int64_t heads, int64_t dim_head, const at::TensorOptions& opts);
  // x [B, N, query_dim], context [B, M, context_dim] (undefined: self-attention) -> [B, N, query_dim]
  at::Tensor forward(const at::Tensor& x, const at::Tensor& context = {});

  Linear to_q{nullptr}, to_k{nullptr}, to_v{nullptr}, to_out_0{nullptr};
  torch::nn::ModuleList to_out;
  int64_t heads;
};
TORCH_MODULE(Attention);

// attention.py FeedForward with activation_fn "geglu": net.0 = GEGLU (proj: dim -> 2*inner),
// net.1 = Dropout, net.2 = Linear(inner -> dim).
class FeedForwardImpl : public torch::nn::Module {
 public:
  FeedForwardImpl(int64_t dim, int64_t inner_dim, const at::TensorOptions& opts);
  at::Tensor forward(const at::Tensor& x);  // [B, N, dim] -> [B, N, dim]

  Linear geglu_proj{nullptr}, out{nullptr};  // net.0.proj, net.2
  torch::nn::ModuleList net;
};
TORCH_MODULE(FeedForward);

// attention.py BasicTransformerBlock, norm_type "layer_norm": self-attention, cross-attention, GEGLU MLP.
class BasicTransformerBlockImpl : public torch::nn::Module {
 public:
  BasicTransformerBlockImpl(int64_t dim, int64_t heads, int64_t dim_head, int64_t cross_attention_dim, const at::TensorOptions& opts);
  at::Tensor forward(const at::Tensor& x, const at::Tensor& context);  // x [B, N, dim], context [B, M, C] -> [B, N, dim]

  LayerNorm norm1{nullptr}, norm2{nullptr}, norm3{nullptr};
  Attention attn1{nullptr}, attn2{nullptr};
  FeedForward ff{nullptr};
};
TORCH_MODULE(BasicTransformerBlock);

// transformer_2d.py Transformer2DModel for continuous inputs: GroupNorm (eps 1e-6) -> proj_in ->
// transformer_blocks -> proj_out, plus the residual. proj_in/proj_out are 1x1 convs, or Linear
// layers applied after flattening when use_linear_projection.
class Transformer2DModelImpl : public torch::nn::Module {
 public:
  Transformer2DModelImpl(int64_t heads, int64_t dim_head, int64_t in_channels, int64_t num_layers, int64_t cross_attention_dim,
                         int64_t norm_num_groups, bool use_linear_projection, const at::TensorOptions& opts);
  at::Tensor forward(const at::Tensor& x, const at::Tensor& context);  // x [B, C, H, W], context [B, M, D] -> [B, C, H, W]

  GroupNorm norm{nullptr};
  Conv2d proj_in_conv{nullptr}, proj_out_conv{nullptr};        // when !use_linear_projection
  Linear proj_in_linear{nullptr}, proj_out_linear{nullptr};    // when use_linear_projection
  torch::nn::ModuleList transformer_blocks;
  std::vector<BasicTransformerBlock> blocks;
  bool use_linear_projection;
  int64_t inner_dim;
};
TORCH_MODULE(Transformer2DModel);

// resnet.py Downsample2D with use_conv: 3x3 conv, stride 2 (padding 0 pads right/bottom by one first).
class Downsample2DImpl : public torch::nn::Module {
 public:
  Downsample2DImpl(int64_t channels, int64_t padding, const at::TensorOptions& opts);
  at::Tensor forward(const at::Tensor& x);  // [B, C, H, W] -> [B, C, ceil(H/2), ceil(W/2)] for padding 1

  Conv2d conv{nullptr};
  int64_t padding;
};
TORCH_MODULE(Downsample2D);

// resnet.py Upsample2D with use_conv: nearest-neighbour resize to `size`, then a 3x3 conv.
class Upsample2DImpl : public torch::nn::Module {
 public:
  Upsample2DImpl(int64_t channels, const at::TensorOptions& opts);
  at::Tensor forward(const at::Tensor& x, at::IntArrayRef size);  // [B, C, H, W] -> [B, C, size[0], size[1]]

  Conv2d conv{nullptr};
};
TORCH_MODULE(Upsample2D);

// unet_2d_blocks.py CrossAttnDownBlock2D (with_attention) and DownBlock2D (without): the same
// resnet/[attention] pairs and optional downsampler; the blocks differ only in the attentions.
class DownBlockImpl : public torch::nn::Module {
 public:
  DownBlockImpl(bool with_attention, int64_t in_channels, int64_t out_channels, int64_t temb_channels, int64_t num_layers,
                int64_t transformer_layers, int64_t heads, int64_t cross_attention_dim, bool add_downsample,
                const UNetConfig& cfg, const at::TensorOptions& opts);
  // x [B, in, H, W] -> hidden state [B, out, H', W']; appends each resnet/attention output and the
  // downsampler output to `skips` (the tuple diffusers returns as output_states).
  at::Tensor forward(const at::Tensor& x, const at::Tensor& temb, const at::Tensor& context, std::vector<at::Tensor>& skips);

  torch::nn::ModuleList attentions, resnets, downsamplers;
  std::vector<Transformer2DModel> attns;
  std::vector<ResnetBlock2D> res;
  Downsample2D down{nullptr};
};
TORCH_MODULE(DownBlock);

// unet_2d_blocks.py UNetMidBlock2DCrossAttn: resnet, then (attention, resnet) per layer.
class UNetMidBlock2DCrossAttnImpl : public torch::nn::Module {
 public:
  UNetMidBlock2DCrossAttnImpl(int64_t channels, int64_t temb_channels, int64_t transformer_layers, int64_t heads,
                              int64_t cross_attention_dim, const UNetConfig& cfg, const at::TensorOptions& opts);
  at::Tensor forward(const at::Tensor& x, const at::Tensor& temb, const at::Tensor& context);  // [B, C, H, W] -> same

  torch::nn::ModuleList attentions, resnets;
  std::vector<Transformer2DModel> attns;
  std::vector<ResnetBlock2D> res;
};
TORCH_MODULE(UNetMidBlock2DCrossAttn);

// unet_2d_blocks.py CrossAttnUpBlock2D (with_attention) and UpBlock2D (without).
class UpBlockImpl : public torch::nn::Module {
 public:
  UpBlockImpl(bool with_attention, int64_t in_channels, int64_t prev_output_channels, int64_t out_channels, int64_t temb_channels,
              int64_t num_layers, int64_t transformer_layers, int64_t heads, int64_t cross_attention_dim, bool add_upsample,
              const UNetConfig& cfg, const at::TensorOptions& opts);
  // x [B, prev, H, W]; skips: this block's skip connections, consumed from the back (one per
  // resnet); upsample_size: the spatial size of the next block's first skip (ignored without upsampler).
  at::Tensor forward(const at::Tensor& x, const at::Tensor& temb, const at::Tensor& context, std::vector<at::Tensor> skips,
                     at::IntArrayRef upsample_size);

  torch::nn::ModuleList attentions, resnets, upsamplers;
  std::vector<Transformer2DModel> attns;
  std::vector<ResnetBlock2D> res;
  Upsample2D up{nullptr};
};
TORCH_MODULE(UpBlock);

class UNet2DConditionModelImpl : public torch::nn::Module {
 public:
  UNet2DConditionModelImpl(const UNetConfig& cfg, const at::TensorOptions& opts);

  // sample [B, in_channels, h, w] (any h, w >= 1), timestep [] / [1] / [B] (integer or float),
  // encoder_hidden_states [B, M, cross_attention_dim] -> noise prediction [B, out_channels, h, w].
  at::Tensor forward(const at::Tensor& sample, const at::Tensor& timestep, const at::Tensor& encoder_hidden_states);
  // Same, and stores the outputs of diffusers' submodules (the golden case's hook names: time_proj,
  // time_embedding, conv_in, down_blocks.i, mid_block, up_blocks.i, conv_norm_out, conv_act) in *debug.
  at::Tensor forward(const at::Tensor& sample, const at::Tensor& timestep, const at::Tensor& encoder_hidden_states, TensorMap* debug);

  // Memory and speed switches, both off by default (forward is then exactly the diffusers port):
  //   gradient_checkpointing: with grad mode on, each down/mid/up block runs through
  //     checkpoint_block (checkpoint.h): its activations are recomputed in backward instead of kept.
  //     No effect under NoGradGuard (inference). Set by the trainer for its steps.
  //   channels_last: the sample enters the UNet in channels-last (NHWC) memory order; with the conv
  //     weights converted by set_channels_last, cuDNN picks its NHWC tensor-core kernels. Same math;
  //     meant for CUDA with bf16/fp16 (on the CPU it is allowed but rarely faster).
  bool gradient_checkpointing = false;
  bool channels_last = false;
  // Converts every 4-D weight to channels-last (or back to contiguous) memory order, in place, and
  // sets channels_last.
  void set_channels_last(bool on);

  UNetConfig cfg;
  Conv2d conv_in{nullptr}, conv_out{nullptr};
  TimestepEmbedding time_embedding{nullptr};
  torch::nn::ModuleList down_blocks, up_blocks;
  std::vector<DownBlock> downs;
  std::vector<UpBlock> ups;
  UNetMidBlock2DCrossAttn mid_block{nullptr};
  GroupNorm conv_norm_out{nullptr};
};
TORCH_MODULE(UNet2DConditionModel);

}  // namespace si
