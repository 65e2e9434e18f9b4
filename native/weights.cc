#include "weights.h"
#include "util.h"

#include <torch/csrc/autograd/grad_mode.h>

#include <map>
#include <sstream>

namespace si {

namespace {

// At most `limit` names, then "... and N more": a broken 1,000-key file must still give a readable error.
void list(std::ostringstream& o, const char* title, const std::vector<std::string>& items, size_t limit = 25) {
  if (items.empty()) return;
  o << "\n  " << items.size() << " " << title << ":";
  for (size_t i = 0; i < items.size() && i < limit; ++i) o << "\n    " << items[i];
  if (items.size() > limit) o << "\n    ... and " << items.size() - limit << " more";
}

}  // namespace

size_t load_weights_strict(torch::nn::Module& module, const std::vector<std::shared_ptr<SafetensorsFile>>& files,
                           const std::vector<WeightSource>& map, const std::string& what) {
  std::map<std::string, at::Tensor> targets;
  for (const auto& p : module.named_parameters(true)) targets[p.key()] = p.value();
  for (const auto& b : module.named_buffers(true)) targets[b.key()] = b.value();

  std::vector<std::string> missing, unexpected, misshaped;
  std::map<std::string, const WeightSource*> by_target;
  for (const auto& src : map) {
    if (src.file >= files.size()) throw std::invalid_argument(what + ": weight map names file #" + std::to_string(src.file) + " of " + std::to_string(files.size()));
    const auto& f = files[src.file];
    if (!f->contains(src.key)) {
      throw std::invalid_argument(what + ": weight map names key \"" + src.key + "\" that " + f->path() + " does not contain");
    }
    auto it = targets.find(src.target);
    if (it == targets.end()) {
      unexpected.push_back(src.key + (src.key != src.target ? " (as " + src.target + ")" : "") + "  [" + f->path() + "]");
      continue;
    }
    if (!by_target.emplace(src.target, &src).second) throw std::invalid_argument(what + ": two tensors map to " + src.target);
    const TensorInfo& info = f->info(src.key);
    at::IntArrayRef want = it->second.sizes();
    int64_t numel = 1;
    for (auto d : info.shape) numel *= d;
    bool same = at::IntArrayRef(info.shape) == want;
    if (!same && !(src.reshape && numel == it->second.numel()))
      misshaped.push_back(src.key + ": expected " + shape_str(want) + " but the file has " + shape_str(info.shape) + "  [" + f->path() + "]");
  }
  for (const auto& [name, t] : targets)
    if (!by_target.count(name)) missing.push_back(name);

  if (!missing.empty() || !unexpected.empty() || !misshaped.empty()) {
    std::ostringstream o;
    o << what << ": the weights do not match the model built from its config";
    list(o, "missing keys", missing);
    list(o, "unexpected keys", unexpected);
    list(o, "keys with the wrong shape", misshaped);
    throw std::invalid_argument(o.str());
  }

  torch::NoGradGuard no_grad;
  for (const auto& [name, src] : by_target) {
    at::Tensor& dst = targets[name];
    at::Tensor value = files[src->file]->load(src->key);
    dst.copy_(value.reshape(dst.sizes()));
  }
  return by_target.size();
}

}  // namespace si
