// Stub for the CPU emulation: cooperative_groups is defined in emulate.h.
#pragma once
