# Inert on purpose. singleinsert-native builds with CMake through cmake-js (scripts/build-native.mjs),
# not node-gyp: libtorch ships a CMake package (TorchConfig.cmake) that supplies include paths,
# the library list and ABI/CUDA flags, and these differ between Debian's libtorch 1.13 and the
# CUDA libtorch 2.x inside Python torch. Copying them into gyp would be a second, untested build.
# package.json sets "gypfile": false and owns the "install" script, so npm never runs node-gyp
# on this file; it is kept only so that tools that look for binding.gyp find this explanation.
{
  "targets": []
}
