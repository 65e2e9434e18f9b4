// Strict loading of safetensors weights into a model port.
#pragma once

#include <torch/nn/module.h>

#include <memory>
#include <string>
#include <vector>

#include "safetensors.h"

namespace si {

// One parameter's source: model key <- file[file].key. `reshape` allows a same-size reshape (the
// original SD layout stores VAE attention projections as 1x1 convs [C,C,1,1] where diffusers has
// Linear [C,C]). The map is built by lib/keymap.ts, the one place where key names are translated.
struct WeightSource {
  std::string target;
  size_t file = 0;
  std::string key;
  bool reshape = false;
};

// Copies every mapped tensor into the module's parameters/buffers (converting dtype and device).
// Fails with ONE error listing every missing, unexpected and mis-shaped key, naming the files.
// Returns the number of tensors loaded.
size_t load_weights_strict(torch::nn::Module& module, const std::vector<std::shared_ptr<SafetensorsFile>>& files,
                           const std::vector<WeightSource>& map, const std::string& what);

}  // namespace si
