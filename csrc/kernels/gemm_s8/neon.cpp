// PLACEHOLDER until the NEON kernels land: the reference, compiled for the set.
#include "kernels/gemm_s8/ref.cpp"
