// Argument checks shared by the kernels' C ABI entry points (see build.py for the ABI).
//
// The entry points take raw pointers, so each buffer comes with its size in bytes: a call whose
// buffers are shorter than its shapes say is refused before anything is read or written, and so is
// one whose element counts overflow. A refusal returns a nonzero code and leaves a one-line message
// for edge_last_error() on the calling thread.
#pragma once

#include <cstdint>

namespace edge {

enum Code : int32_t { kOk = 0, kBadPointer = 1, kBadShape = 2, kBadQuant = 3, kNoMemory = 4, kShortBuffer = 5 };

// Records "<fmt formatted>" as this thread's last error and returns `code`.
int32_t refuse(int32_t code, const char* fmt, ...) __attribute__((format(printf, 2, 3)));

// a·b·c·d (1 for absent factors) into *out; false when it overflows int64 or a factor is negative.
bool count(int64_t* out, int64_t a, int64_t b = 1, int64_t c = 1, int64_t d = 1);

// 0 when buffer `name` of `bytes` bytes at `ptr` holds `elems` elements of `elem_size` bytes, else a
// refusal naming the buffer (a null pointer passes only for zero elements). `op` names the entry point.
int32_t need(const char* op, const char* name, const void* ptr, int64_t bytes, int64_t elems, int64_t elem_size);

}  // namespace edge
