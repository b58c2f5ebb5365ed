// PLACEHOLDER until the NEON kernels land: the reference, compiled for the set.
#include "kernels/probe/ref.cpp"
