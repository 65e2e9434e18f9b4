// Gradient checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost") for
// the UNet blocks: libtorch's C++ frontend has no torch.utils.checkpoint, so this is one custom
// autograd function. Its forward runs a block without grad and saves only the block's inputs; its
// backward runs the block again with grad and differentiates that local graph. Training then holds
// one block's activations at a time instead of the whole UNet's, for about one extra forward.
//
// Differences from torch.utils.checkpoint (use_reentrant=True), and why:
//   - the trainable tensors inside the block (LoRA adapters and parameters that require grad) are
//     passed to the function as extra inputs, so their gradients flow even when no block input
//     requires grad (stage II's L_sm: x_t and the class prompt are constants there) and also through
//     torch::autograd::grad, not only .backward();
//   - no RNG state is saved: the SD v1.x blocks have no dropout (eval mode), so a recompute is
//     deterministic; the thread's LoRA bypass flag (layers.h) is saved and restored instead, because
//     backward may run on another thread (CUDA's device threads).
#pragma once

#include <ATen/ATen.h>
#include <torch/nn/module.h>

#include <functional>
#include <vector>

namespace si {

// A block as a function of its tensor inputs; it returns its outputs (at least one).
using BlockFn = std::function<std::vector<at::Tensor>(const std::vector<at::Tensor>& inputs)>;

// fn(inputs), without keeping fn's intermediate activations for backward. `block` is the module fn
// runs: its trainable tensors (see above) are found there. Call it only with grad mode on; the
// outputs equal fn(inputs) bit for bit, and so do the gradients (the recompute runs the same ops).
std::vector<at::Tensor> checkpoint_block(torch::nn::Module& block, BlockFn fn, const std::vector<at::Tensor>& inputs);

}  // namespace si
