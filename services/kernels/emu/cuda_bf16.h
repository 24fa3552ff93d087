// Emulator stand-in for CUDA's <cuda_bf16.h>: __nv_bfloat16 and its conversions live in cuda_emu.h.
#pragma once
#include "cuda_emu.h"
