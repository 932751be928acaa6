// Row copies shared by the masked_gather / masked_scatter CUDA kernels: rows are moved as the widest word
// (16, 8, 4, 2 or 1 bytes) that divides the row size, the base pointers and the strides, so any dtype copies at
// full width when the layout allows it.
#pragma once

#include <cstdint>

#include "cuda_common.cuh"

namespace kdforge::cuda {

// Widest power-of-two word (<= 16 bytes) that divides every value given.
inline int copy_word_bytes(std::initializer_list<int64_t> values) {
  int w = 16;
  for (int64_t v : values) {
    while (w > 1 && (v % w) != 0) w >>= 1;
  }
  return w;
}

// Calls f.template operator()<word_t>() with the word type of `bytes`.
template <typename F>
void dispatch_word(int bytes, F&& f) {
  switch (bytes) {
    case 16: f(int4{}); break;
    case 8: f(int2{}); break;
    case 4: f(int32_t{}); break;
    case 2: f(int16_t{}); break;
    default: f(int8_t{}); break;
  }
}

}  // namespace kdforge::cuda
