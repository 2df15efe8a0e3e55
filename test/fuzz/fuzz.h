/*
 * Shared declarations of the fuzz targets. Each target defines the libFuzzer entry point and
 * bw_fuzz_split(), which runs the same checks with the input cut at a given position; libFuzzer
 * reaches it through the entry point, the replay driver (replay.c) calls it for every position.
 */
#ifndef BREAKWATER_FUZZ_H
#define BREAKWATER_FUZZ_H

#include <stddef.h>
#include <stdint.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
void bw_fuzz_split(const uint8_t *data, size_t size, size_t split);

#endif
