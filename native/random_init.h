// Random weights for benchmarks and smoke tests: a full-size SD v1.5 model without downloading it.
//
// The recipe is the fixtures' and the embedded tiny model's (lib/tiny-model.ts), chosen so that
// activations stay O(1) through any depth: Linear/Conv weights N(0, 1/fan_in), biases N(0, 0.05²),
// GroupNorm/LayerNorm weights 1 + N(0, 0.1²) and biases N(0, 0.1²), embeddings and other free
// parameters N(0, 0.3²). The numbers are drawn on the parameters' device (a private generator of the
// device's kind, seeded once, in named_parameters() order), in float32, then cast to the parameter's
// dtype: fast enough for 1.07 B parameters on a GPU. They depend on the seed and the device kind only;
// they are NOT the tiny model's bytes (that one is drawn in JavaScript).
#pragma once

#include <torch/nn/module.h>

#include <cstdint>

namespace si {

// Fills every parameter of `module`; returns how many tensors it filled.
size_t random_init(torch::nn::Module& module, uint64_t seed);

}  // namespace si
