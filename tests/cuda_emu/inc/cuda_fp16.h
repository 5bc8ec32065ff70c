#pragma once
#include "emu.h"  // the emulator stands in for the CUDA runtime and type headers
