// TEMPORARY (removed before commit of the model port): lets the addon link while model files are written.
#include "model.h"
namespace si {
#define SI_MISSING(fn) std::shared_ptr<NativeModel> fn(const JsonValue&, const at::TensorOptions&) { throw std::invalid_argument(#fn " is not built yet"); }
SI_MISSING(make_unet) SI_MISSING(make_vae) SI_MISSING(make_clip_text) SI_MISSING(make_clip_vision) SI_MISSING(make_clip) SI_MISSING(make_vit)
}
