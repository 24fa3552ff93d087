// Emulator stand-in for CUDA's <cuda_fp16.h>: __half and its conversions live in cuda_emu.h.
#pragma once
#include "cuda_emu.h"
