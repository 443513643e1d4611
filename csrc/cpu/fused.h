// CPU side: the device struct for ops.h. Its members are defined next to the op that uses them
// (dora.cpp, bottleneck.cpp), with ATen for the fused elementwise parts.
#pragma once
#include "../ops.h"

namespace adaptune {

struct Cpu {
  ADAPTUNE_DEVICE_MEMBERS
};

}  // namespace adaptune
