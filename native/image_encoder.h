// The SingleInsert image encoder: it maps the input image to the embedding of the placeholder `*`
// (Wu et al., 2023, Sec. 3: a CLIP ViT-B/32 image encoder followed by a linear head into the text
// encoder's token-embedding space).
//
//   SingleInsertEncoder = CLIPVisionModelWithProjection (clip.h)  ->  head: Linear(projection_dim -> text hidden)
//
// Keys: `vision_model.*`, `visual_projection.weight` (the transformers CLIPVisionModelWithProjection
// keys, so a pretrained checkpoint loads as it is) plus `head.weight` and `head.bias`.
#pragma once

#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <cstdint>
#include <string>

#include "clip.h"
#include "json.h"
#include "layers.h"

namespace si {

class SingleInsertEncoderImpl : public ClipVisionModelWithProjectionImpl {
 public:
  // head_out: the text encoder's hidden size (768 for SD v1.5, 32 for tiny-sd)
  SingleInsertEncoderImpl(const ClipVisionConfig& cfg, int64_t head_out, const at::TensorOptions& opts);
  // pixel_values: [B, 3, S, S], CLIP-normalised -> placeholder embeddings [B, head_out]
  at::Tensor embed(const at::Tensor& pixel_values);

  ClipVisionConfig config;
  Linear head{nullptr};
};
TORCH_MODULE(SingleInsertEncoder);

// Reads a resolved clip_vision config (lib/config.ts) plus the key `head_out`.
SingleInsertEncoder make_singleinsert_encoder(const JsonValue& config, const at::TensorOptions& opts);

// Random initialisation in the style of transformers 4.33 CLIPPreTrainedModel._init_weights
// (initializer_range 0.02, initializer_factor 1), drawn on the CPU from `generator` in
// named_parameters() order, then copied to the parameters' device:
//   class_embedding ~ N(0, hidden^-0.5); patch and position embeddings ~ N(0, 0.02)
//   q/k/v_proj ~ N(0, hidden^-0.5 · (2·layers)^-0.5); out_proj ~ N(0, hidden^-0.5)
//   fc1 ~ N(0, (2·hidden)^-0.5); fc2 ~ N(0, hidden^-0.5 · (2·layers)^-0.5)
//   visual_projection ~ N(0, hidden^-0.5); head.weight ~ N(0, 0.02)
//   every bias 0; LayerNorm weight 1, bias 0
void init_singleinsert_encoder(SingleInsertEncoderImpl& encoder, at::Generator generator);

// Loads a pretrained CLIPVisionModelWithProjection (or a saved SingleInsert encoder) from a
// safetensors file: every `vision_model.*` and `visual_projection.weight` key must be present with
// its shape; `head.*` is loaded when the file has it (returns true) and otherwise keeps its values.
// `vision_model.embeddings.position_ids` (older transformers files) and a CLIPModel's text tower
// (`text_model.*`, `text_projection.weight`, `logit_scale`) are skipped; any other unknown key is an
// error naming the file.
bool load_singleinsert_encoder(SingleInsertEncoderImpl& encoder, const std::string& path);

}  // namespace si
