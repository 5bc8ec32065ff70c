"""`python -m tbkernels`: version, build and the backend table for this machine."""
import torch

import tbkernels

print(f"tbkernels {tbkernels.__version__}, torch {torch.__version__}")
for device in ("cpu", "cuda"):
    print(f"\nbackends for {device} tensors:")
    for name, status in tbkernels.backends(device).items():
        print(f"  {name:<10} {status}")
