#include <cstdio>
#include "dispatch.h"
int main() { for (auto& s : lowbit::available_isas()) std::printf("%s\n", s.c_str()); }
