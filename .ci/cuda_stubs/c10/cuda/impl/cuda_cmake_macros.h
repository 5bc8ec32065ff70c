#pragma once
// CI syntax-check stand-in (see .ci/cuda_stubs/README.md) for the header a CUDA build of torch
// generates and a CPU wheel does not ship.
#define C10_CUDA_BUILD_SHARED_LIBS
