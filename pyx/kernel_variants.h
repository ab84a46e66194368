/* kernel_variants.h: kernel_impl.h compiled for each instruction set, for
 * the compute type kernel.h has defined (KV_T, KV_REAL, KV_DOUBLE, KV_BIG).
 * Included by kernel.h only, once per compute type. Per variant:
 *     KV_SUFFIX  KV_T followed by the instruction set, e.g. _f_avx2
 *     KV_VBYTES  the native vector width in bytes
 *     KV_F16C    halves converted per F16C instruction (0: no F16C)
 */
#if KV_HAVE_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")
#define KV_SUFFIX KV_CAT(KV_T, _avx512)
#define KV_VBYTES 64
#define KV_F16C 16
#include "kernel_impl.h"
#undef KV_SUFFIX
#undef KV_VBYTES
#undef KV_F16C
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define KV_SUFFIX KV_CAT(KV_T, _avx2)
#define KV_VBYTES 32
#define KV_F16C 8
#include "kernel_impl.h"
#undef KV_SUFFIX
#undef KV_VBYTES
#undef KV_F16C
#pragma GCC pop_options
#endif

#define KV_SUFFIX KV_CAT(KV_T, _baseline)
#define KV_VBYTES 16
#define KV_F16C 0
#include "kernel_impl.h"
#undef KV_SUFFIX
#undef KV_VBYTES
#undef KV_F16C
