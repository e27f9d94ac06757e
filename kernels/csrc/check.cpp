// The shared argument checks of check.h and edge_last_error().
#include "check.h"

#include <cstdarg>
#include <cstdio>

namespace edge {
namespace {
thread_local char last_error[512] = "";
}

int32_t refuse(int32_t code, const char* fmt, ...) {
    va_list args;
    va_start(args, fmt);
    std::vsnprintf(last_error, sizeof(last_error), fmt, args);
    va_end(args);
    return code;
}

bool count(int64_t* out, int64_t a, int64_t b, int64_t c, int64_t d) {
    if (a < 0 || b < 0 || c < 0 || d < 0) return false;
    int64_t ab, abc;
    return !__builtin_mul_overflow(a, b, &ab) && !__builtin_mul_overflow(ab, c, &abc) &&
           !__builtin_mul_overflow(abc, d, out);
}

int32_t need(const char* op, const char* name, const void* ptr, int64_t bytes, int64_t elems, int64_t elem_size) {
    int64_t want;
    if (!count(&want, elems, elem_size)) return refuse(kBadShape, "%s: %s would hold %lld elements: too many", op, name,
                                                       static_cast<long long>(elems));
    if (want > 0 && ptr == nullptr) return refuse(kBadPointer, "%s: %s is null, expected %lld bytes", op, name,
                                                  static_cast<long long>(want));
    if (bytes < want)
        return refuse(kShortBuffer, "%s: %s holds %lld bytes, expected %lld (%lld elements)", op, name,
                      static_cast<long long>(bytes), static_cast<long long>(want), static_cast<long long>(elems));
    return kOk;
}

}  // namespace edge

extern "C" const char* edge_last_error() { return edge::last_error; }
