// Gradient checkpointing of a block (see checkpoint.h).
#include "checkpoint.h"

#include <ATen/core/ivalue.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <set>
#include <utility>

#include "layers.h"

namespace si {

namespace {

// What backward needs besides the saved tensors (a capsule in ctx->saved_data, as autograd
// contexts hold IValues only).
struct Recompute : torch::CustomClassHolder {
  BlockFn fn;
  size_t num_inputs = 0;       // the block's own inputs; the rest of the function's inputs are trainable tensors
  bool lora_bypassed = false;  // the forward thread's LoRA bypass flag
};

// Sets this thread's LoRA bypass flag for a scope (lora.h's LoraBypass only turns it on).
class BypassAs {
 public:
  explicit BypassAs(bool value) : previous_(lora_bypassed()) { lora_bypassed() = value; }
  ~BypassAs() { lora_bypassed() = previous_; }
  BypassAs(const BypassAs&) = delete;
  BypassAs& operator=(const BypassAs&) = delete;

 private:
  bool previous_;
};

class CheckpointFunction : public torch::autograd::Function<CheckpointFunction> {
 public:
  // inputs: the block's inputs, then its trainable tensors. Runs with grad mode off (Function::apply).
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, c10::intrusive_ptr<Recompute> recompute,
                                                at::TensorList inputs) {
    ctx->save_for_backward(inputs.vec());
    std::vector<at::Tensor> block_inputs(inputs.begin(), inputs.begin() + static_cast<std::ptrdiff_t>(recompute->num_inputs));
    std::vector<at::Tensor> outputs = recompute->fn(block_inputs);
    ctx->saved_data["recompute"] = c10::IValue::make_capsule(std::move(recompute));
    return outputs;
  }

  // One gradient per forward argument: none for the Recompute holder, then one per input tensor.
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx, torch::autograd::variable_list grad_outputs) {
    auto recompute = c10::static_intrusive_pointer_cast<Recompute>(ctx->saved_data["recompute"].toCapsule());
    const torch::autograd::variable_list saved = ctx->get_saved_variables();
    const size_t n = recompute->num_inputs;

    // 1. the block again, with grad, from detached copies of its inputs (a local graph)
    std::vector<at::Tensor> inputs(n);
    for (size_t i = 0; i < n; ++i) {
      if (!saved[i].defined()) continue;
      inputs[i] = saved[i].detach();
      if (saved[i].requires_grad()) inputs[i].requires_grad_(true);
    }
    std::vector<at::Tensor> outputs;
    {
      torch::autograd::AutoGradMode grad_on(true);
      BypassAs bypass(recompute->lora_bypassed);
      outputs = recompute->fn(inputs);
    }

    // 2. differentiate it w.r.t. the inputs that require grad and the trainable tensors
    std::vector<at::Tensor> roots, grads, targets;
    std::vector<size_t> slots;  // position of each target among the function's input tensors
    for (size_t i = 0; i < outputs.size() && i < grad_outputs.size(); ++i) {
      if (outputs[i].requires_grad() && grad_outputs[i].defined()) {
        roots.push_back(outputs[i]);
        grads.push_back(grad_outputs[i]);
      }
    }
    for (size_t i = 0; i < saved.size(); ++i) {
      const at::Tensor& t = i < n ? inputs[i] : saved[i];
      if (t.defined() && t.requires_grad()) {
        targets.push_back(t);
        slots.push_back(i);
      }
    }
    torch::autograd::variable_list result(1 + saved.size());  // result[0]: the Recompute holder
    if (!roots.empty() && !targets.empty()) {
      torch::autograd::variable_list g =
          torch::autograd::grad(roots, targets, grads, /*retain_graph=*/false, /*create_graph=*/false, /*allow_unused=*/true);
      for (size_t k = 0; k < slots.size(); ++k) result[1 + slots[k]] = g[k];
    }
    return result;
  }
};

// The tensors inside `block` that training updates: active LoRA adapters (not registered
// parameters, see layers.h) and registered parameters, where they require grad.
std::vector<at::Tensor> trainable_tensors(torch::nn::Module& block) {
  std::vector<at::Tensor> out;
  std::set<const at::TensorImpl*> seen;
  auto add = [&](const at::Tensor& t) {
    if (t.defined() && t.requires_grad() && seen.insert(t.unsafeGetTensorImpl()).second) out.push_back(t);
  };
  auto visit = [&](torch::nn::Module* m) {
    const LoraAdapters* lora = nullptr;
    if (auto* l = dynamic_cast<LinearImpl*>(m)) lora = &l->lora;
    else if (auto* c = dynamic_cast<Conv2dImpl*>(m)) lora = &c->lora;
    if (lora)
      for (const auto& a : *lora)
        if (a->active()) {
          add(a->down);
          add(a->up);
        }
  };
  visit(&block);
  for (const auto& m : block.modules(/*include_self=*/false)) visit(m.get());
  for (const auto& p : block.parameters(/*recurse=*/true)) add(p);
  return out;
}

}  // namespace

std::vector<at::Tensor> checkpoint_block(torch::nn::Module& block, BlockFn fn, const std::vector<at::Tensor>& inputs) {
  auto recompute = c10::make_intrusive<Recompute>();
  recompute->fn = std::move(fn);
  recompute->num_inputs = inputs.size();
  recompute->lora_bypassed = lora_bypassed();
  std::vector<at::Tensor> all = inputs;
  if (!recompute->lora_bypassed)
    for (auto& t : trainable_tensors(block)) all.push_back(t);
  return CheckpointFunction::apply(recompute, at::TensorList(all));
}

}  // namespace si
